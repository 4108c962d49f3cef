"""Reply deadlines: how long an agent may stay silent about a job it was sent.

The values only; agent_command.py applies them to each command, and the controller's config
(`[jobs]` in controller.toml) sets them. Both are durations of silence, not of the job: a
backup that runs for a day is never cut short while its agent keeps naming it in its
heartbeats.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_ACKNOWLEDGE_SECONDS = 120.0
DEFAULT_SILENCE_SECONDS = 600.0


@dataclass(frozen=True)
class ReplyDeadlines:
    acknowledge_seconds: float = DEFAULT_ACKNOWLEDGE_SECONDS
    """From sending a command to the agent's first word of its job (a heartbeat names it
    within one heartbeat interval of taking it)."""
    silence_seconds: float = DEFAULT_SILENCE_SECONDS
    """Between two words of the agent about a job it took (heartbeats every few seconds;
    progress and data-path calls more often)."""
