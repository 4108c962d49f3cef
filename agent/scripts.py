"""Pre- and post-scripts: the VM owner's commands that quiesce and resume applications.

The pre-script runs before the file systems are frozen (e.g. a database flushes and locks its
tables), the post-script after they are thawed (it unlocks them). Each is configured per VM
with a path, arguments, a timeout, a number of retries, and whether the backup goes on when
it fails (`continue_on_failure`: the recovery point is then only file-system consistent).

A script runs as its own process group with no standard input; on timeout the whole group is
killed, so a script's children do not outlive it. The tail of its stderr goes into the error.
Like the cloud backup extensions, the agent runs only scripts that are owned by root (its own
user) and writable by nobody else: a script anyone can change runs as root at every backup.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from shared.config import NonEmpty, Seconds, Section, validate
from shared.errors import PostScriptFailed, PreScriptFailed

log = logging.getLogger(__name__)

STDERR_TAIL = 2048  # bytes of a failed script's stderr kept for its error
DRAIN_TIMEOUT = 2.0  # for the output of a killed script's group to close


class Phase(enum.StrEnum):
    PRE = "pre"
    POST = "post"


@dataclass(frozen=True)
class Script:
    path: Path
    args: tuple[str, ...] = ()
    timeout: float = 60.0  # seconds, per attempt
    retries: int = 0  # attempts after the first
    continue_on_failure: bool = False
    retry_delay: float = 1.0

    @staticmethod
    def from_toml(raw: Mapping[str, Any], where: str) -> Script:
        """A script from its TOML table, e.g. `[consistency.pre_script]` (`where`)."""
        return validate(ScriptSection, raw, where).script()


class ScriptSection(Section):
    """A script's table in the agent config (`[consistency.pre_script]`, `.post_script`)."""

    path: NonEmpty
    args: list[str] = []
    timeout: Seconds = 60.0
    retries: Annotated[int, Field(ge=0)] = 0
    continue_on_failure: bool = False
    retry_delay: Annotated[float, Field(ge=0)] = 1.0

    def script(self) -> Script:
        return Script(
            path=Path(self.path),
            args=tuple(self.args),
            timeout=self.timeout,
            retries=self.retries,
            continue_on_failure=self.continue_on_failure,
            retry_delay=self.retry_delay,
        )


@dataclass
class ScriptResult:
    ok: bool
    attempts: int
    cause: str = ""  # why the last attempt failed
    stderr_tail: str = ""
    durations: list[float] = field(default_factory=list)  # seconds, per attempt


def check_script(script: Script) -> str | None:
    """Why the agent refuses to run `script`, or None."""
    try:
        info = os.stat(script.path)
    except OSError as exc:
        return f"cannot be found: {exc.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if not os.access(script.path, os.X_OK):
        return "is not executable (chmod 700 it)"
    if info.st_uid != os.geteuid():
        return f"is owned by uid {info.st_uid}, not by the agent's user (uid {os.geteuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "is writable by group or others (chmod go-w it)"
    return None


async def _attempt(script: Script, env: Mapping[str, str]) -> tuple[str | None, str]:
    """One run: (why it failed or None, the tail of its stderr)."""
    process = await asyncio.create_subprocess_exec(
        str(script.path),
        *script.args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
        start_new_session=True,  # its own process group, killed as one on timeout
    )
    assert process.stderr is not None
    tail = bytearray()

    async def drain() -> None:
        assert process.stderr is not None
        while chunk := await process.stderr.read(65536):
            tail.extend(chunk)
            del tail[:-STDERR_TAIL]

    reader = asyncio.create_task(drain(), name=f"script-stderr-{process.pid}")
    cause: str | None = None
    try:
        await asyncio.wait_for(process.wait(), script.timeout)
    except TimeoutError:
        cause = f"it did not finish within {script.timeout:g} s and was killed"
    finally:
        # Also on cancellation: a script never outlives the backup that started it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        # A child that escaped the group may hold stderr open: do not wait for it forever.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), DRAIN_TIMEOUT)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    stderr = tail.decode(errors="replace").strip()
    if cause is None and process.returncode != 0:
        code = process.returncode
        assert code is not None
        cause = f"it was killed by signal {-code}" if code < 0 else f"it exited with status {code}"
    return cause, stderr


async def run_script(
    script: Script, phase: Phase, env: Mapping[str, str] | None = None
) -> ScriptResult:
    """Run the script with its retries; the outcome (it does not raise for a failed script:
    see `raise_for`)."""
    refused = check_script(script)
    if refused is not None:
        return ScriptResult(False, 0, cause=f"the agent will not run it: it {refused}")
    full_env = {**os.environ, "COFFER_PHASE": str(phase), **(env or {})}
    result = ScriptResult(False, 0)
    loop = asyncio.get_running_loop()
    for attempt in range(1, script.retries + 2):
        if attempt > 1:
            await asyncio.sleep(script.retry_delay)
        started = loop.time()
        cause, stderr = await _attempt(script, full_env)
        result.durations.append(loop.time() - started)
        result.attempts = attempt
        if cause is None:
            result.ok, result.cause, result.stderr_tail = True, "", ""
            return result
        result.cause, result.stderr_tail = cause, stderr
        log.warning("%s-script %s attempt %d failed: %s", phase, script.path, attempt, cause)
    return result


def error_for(
    script: Script, phase: Phase, result: ScriptResult
) -> PreScriptFailed | PostScriptFailed:
    cause = result.cause
    if result.stderr_tail:
        cause += f"; its stderr ended with: {result.stderr_tail[-500:]!r}"
    cls = PreScriptFailed if phase is Phase.PRE else PostScriptFailed
    return cls(path=str(script.path), attempts=result.attempts, cause=cause)
