"""Pre/post scripts: arguments, retries, timeouts that kill the whole group, clear failures."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from agent.scripts import Phase, Script, error_for, run_script
from shared.errors import InvalidArgument, PostScriptFailed, PreScriptFailed

pytestmark = pytest.mark.timeout(60)


def script(tmp_path: Path, body: str, name: str = "quiesce.sh", mode: int = 0o700) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return path


async def test_a_script_gets_its_arguments_and_phase(tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = script(tmp_path, f'echo "$COFFER_PHASE $COFFER_JOB_ID $*" > {out}\n')
    result = await run_script(
        Script(path, args=("--db", "main")), Phase.PRE, {"COFFER_JOB_ID": "job-1"}
    )
    assert result.ok
    assert result.attempts == 1
    assert out.read_text() == "pre job-1 --db main\n"


async def test_a_failing_script_is_retried_and_its_stderr_reported(tmp_path: Path) -> None:
    path = script(tmp_path, 'echo "lock wait timeout on table orders" >&2\nexit 3\n')
    pre = Script(path, retries=2, retry_delay=0.01)
    result = await run_script(pre, Phase.PRE)
    assert not result.ok
    assert result.attempts == 3
    error = error_for(pre, Phase.PRE, result)
    assert isinstance(error, PreScriptFailed)
    assert error.code == "PreScriptFailed"
    assert "failed (3 attempt(s)): it exited with status 3" in str(error)
    assert "lock wait timeout on table orders" in str(error)
    assert "continue_on_failure" in str(error)  # the fix
    post = error_for(pre, Phase.POST, result)
    assert isinstance(post, PostScriptFailed)


async def test_a_retry_can_succeed(tmp_path: Path) -> None:
    count = tmp_path / "count"
    count.write_text("0")
    path = script(tmp_path, f"n=$(($(cat {count}) + 1)); echo $n > {count}; [ $n -ge 2 ]\n")
    result = await run_script(Script(path, retries=3, retry_delay=0.01), Phase.POST)
    assert result.ok
    assert result.attempts == 2


async def test_a_script_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    path = script(tmp_path, f"sleep 300 &\necho $! > {pids}\nsleep 300\n")
    started = time.monotonic()
    result = await run_script(Script(path, timeout=0.5), Phase.PRE)
    assert time.monotonic() - started < 5
    assert not result.ok
    assert "did not finish within 0.5 s and was killed" in result.cause
    child = int(pids.read_text())
    assert not await gone_within(child, 2.5), "the script's child outlived its timeout"


async def gone_within(pid: int, seconds: float) -> bool:
    """Whether `pid` still exists after `seconds` (False as soon as it is gone)."""
    for _ in range(int(seconds / 0.05)):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        await asyncio.sleep(0.05)
    return True


@pytest.mark.parametrize(
    ("mode", "why"),
    [(0o600, "not executable"), (0o720, "writable by group or others")],
)
async def test_a_script_the_agent_should_not_trust_is_refused(
    tmp_path: Path, mode: int, why: str
) -> None:
    out = tmp_path / "ran"
    path = script(tmp_path, f"touch {out}\n", mode=mode)
    result = await run_script(Script(path), Phase.PRE)
    assert not result.ok
    assert result.attempts == 0
    assert why in result.cause
    assert not out.exists()


async def test_a_missing_script_is_a_clear_failure(tmp_path: Path) -> None:
    result = await run_script(Script(tmp_path / "nope.sh"), Phase.PRE)
    assert not result.ok
    assert "cannot be found" in result.cause


def test_script_config_from_toml(tmp_path: Path) -> None:
    parsed = Script.from_toml(
        {"path": "/x.sh", "args": ["a", "1"], "timeout": 5, "continue_on_failure": True}, "t"
    )
    assert parsed == Script(Path("/x.sh"), ("a", "1"), 5.0, 0, True)
    with pytest.raises(InvalidArgument, match="item 2 of 'args' must be a string"):
        Script.from_toml({"path": "/x.sh", "args": ["a", 1]}, "t")  # no str() of a number
    with pytest.raises(InvalidArgument):
        Script.from_toml({"args": []}, "t")
    with pytest.raises(InvalidArgument):
        Script.from_toml({"path": "/x", "timeout": 0}, "t")
