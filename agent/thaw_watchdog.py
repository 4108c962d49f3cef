"""The thaw watchdog: a process apart from the agent that thaws what the agent froze.

A frozen file system blocks every writer in the VM until it is thawed, so the thaw cannot
depend on the agent staying healthy. Before freezing, the agent starts
`python -m agent.thaw_watchdog --deadline SECONDS` in its own session, connected by a pipe,
and "arms" each file system with it (the watchdog opens the mount point itself) before
freezing that file system. The watchdog thaws every armed file system:

- when the deadline passes, counted from the first arm (the agent hung, or a read while
  frozen took too long); it then tells the agent `expired`;
- when the pipe closes without a `done` (the agent died, even by SIGKILL); a file system
  that is not frozen yet then (a FIFREEZE still under way when the agent died) is tried again
  until the deadline, so a freeze that lands after the agent is gone is thawed too;
- on SIGTERM, SIGINT or SIGHUP (someone stops the watchdog: leave nothing frozen).

The agent disarms a file system once it has thawed it itself and says `done` at the end, so a
freeze someone else takes later is never thawed by the watchdog. A thaw of a file system that
is not frozen (EINVAL) counts as already thawed. The watchdog thaws first and talks after:
its stderr may be a log file on a file system it is about to thaw.

Protocol: one JSON object a line. Agent to watchdog: `{"op": "arm", "path": ..., "device":
[major, minor]}` (the watchdog refuses a path that shows another device),
`{"op": "disarm", "path": ...}`, `{"op": "done"}`. Watchdog to agent: `{"ok": "armed"}` or
`{"error": ...}` for each request, and `{"event": "expired", "thawed": [...]}` once.

The process imports only the standard library and everything it needs before the first
arm: a module loaded later might have to be read from a frozen file system.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import sys
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

from shared.errors import CofferError

FITHAW = 0xC0045878  # as in agent.freeze; not imported from there: this process stays small
# The child runs this very copy of the agent package, wherever it is installed.
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)

START_TIMEOUT = 10.0  # for the watchdog to answer a request
RETRY_SECONDS = 0.05  # how often a file system not frozen yet is tried again after the agent died


class _Watchdog:
    """The watchdog process's state: armed descriptors and the deadline."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.armed: dict[str, int] = {}
        self.expires_at: float | None = None  # time.monotonic(); set by the first arm
        self.expired = False
        self._buffer = b""

    def thaw_all(self, *, keep_unfrozen: bool = False) -> list[dict[str, str]]:
        """FITHAW every armed file system; with `keep_unfrozen`, those that were not frozen
        stay armed (a FIFREEZE may still land on them)."""
        outcomes = []
        for path, fd in list(self.armed.items()):
            try:
                fcntl.ioctl(fd, FITHAW, 0)
                outcome = "thawed"
            except OSError as exc:
                outcome = "not-frozen" if exc.errno == errno.EINVAL else f"error: {exc.strerror}"
            outcomes.append({"path": path, "outcome": outcome})
            if not (keep_unfrozen and outcome == "not-frozen"):
                os.close(fd)
                del self.armed[path]
        return outcomes

    def linger(self) -> list[dict[str, str]]:
        """The agent is gone: keep thawing what is still armed until the deadline."""
        expires_at = self.expires_at or time.monotonic()
        thawed: list[dict[str, str]] = []
        while self.armed and time.monotonic() < expires_at:
            time.sleep(RETRY_SECONDS)
            thawed += [o for o in self.thaw_all(keep_unfrozen=True) if o["outcome"] == "thawed"]
        self.thaw_all()
        return thawed

    def send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the agent is gone: nobody to tell
            os.write(1, json.dumps(message).encode() + b"\n")

    def request(self, line: bytes) -> bool:
        """Handle one request; False when the agent said it is done."""
        try:
            message = json.loads(line)
            op = message["op"]
        except (ValueError, KeyError, TypeError):
            self.send({"error": f"bad request {line[:200]!r}"})
            return True
        if op == "done":
            for fd in self.armed.values():
                os.close(fd)
            self.armed.clear()
            return False
        path = str(message.get("path", ""))
        if op == "arm":
            if self.expired:
                self.send({"error": "the deadline has passed"})
                return True
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                self.send({"error": f"cannot open {path}: {exc.strerror}"})
                return True
            device = message.get("device")
            found = os.fstat(fd).st_dev
            if device is not None and [os.major(found), os.minor(found)] != list(device):
                os.close(fd)
                self.send(
                    {
                        "error": f"{path} shows device {os.major(found)}:{os.minor(found)}, "
                        f"not {device[0]}:{device[1]}"
                    }
                )
                return True
            if path in self.armed:
                os.close(self.armed[path])
            self.armed[path] = fd
            if self.expires_at is None:
                self.expires_at = time.monotonic() + self.deadline
            self.send({"ok": "armed"})
        elif op == "disarm":
            fd_or_none = self.armed.pop(path, None)
            if fd_or_none is not None:
                os.close(fd_or_none)
            self.send({"ok": "disarmed"})
        else:
            self.send({"error": f"unknown op {op!r}"})
        return True

    def run(self) -> int:
        while True:
            timeout = None
            if self.expires_at is not None and not self.expired:
                timeout = max(0.0, self.expires_at - time.monotonic())
            readable, _, _ = select.select([0], [], [], timeout)
            if not readable:  # the deadline
                self.expired = True
                thawed = self.thaw_all()
                self.send({"event": "expired", "thawed": thawed})
                print(f"thaw watchdog: deadline passed, thawed {thawed}", file=sys.stderr)
                continue
            data = os.read(0, 65536)
            if not data:  # the agent is gone without saying done
                thawed = self.thaw_all(keep_unfrozen=True)
                thawed += self.linger()
                if thawed:
                    print(f"thaw watchdog: agent gone, thawed {thawed}", file=sys.stderr)
                return 0
            self._buffer += data
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                if not self.request(line):
                    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deadline", type=float, required=True, help="seconds from first arm")
    args = parser.parse_args(argv)
    watchdog = _Watchdog(args.deadline)

    def stop(signum: int, frame: FrameType | None) -> None:
        thawed = watchdog.thaw_all()
        if thawed:
            print(f"thaw watchdog: signal {signum}, thawed {thawed}", file=sys.stderr)
        os._exit(0)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    return watchdog.run()


# -- the agent's side -----------------------------------------------------------------------


class ThawWatchdog:
    """The agent's handle on a watchdog process; an async context manager.

    On a clean exit the watchdog is told `done` (nothing is thawed by it); on any other exit
    the pipe is closed without it, so the watchdog thaws everything still armed.
    """

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.expired_at: float | None = None  # time.monotonic() when the expiry was heard
        self.thawed_by_watchdog: list[dict[str, str]] = []
        self._process: asyncio.subprocess.Process | None = None
        self._replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        # Set when a freeze may still land (abandoned, or in flight): close without `done`.
        self.keep_watching = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def expired(self) -> bool:
        return self.expired_at is not None

    async def __aenter__(self) -> Self:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.thaw_watchdog",
            "--deadline",
            repr(self.deadline),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            # Its own session: a signal to the agent's process group does not reach it.
            start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read(), name=f"thaw-watchdog-{self.pid}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(clean=exc_type is None)

    async def close(self, *, clean: bool = True) -> None:
        """`clean`: tell the watchdog `done` (nothing of ours is frozen). Otherwise it thaws
        what is armed, and keeps trying until its deadline for a freeze still under way: it
        is left running for that, never killed."""
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        clean = clean and not self.keep_watching
        if clean:
            with contextlib.suppress(OSError):
                process.stdin.write(b'{"op": "done"}\n')
                await process.stdin.drain()
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), START_TIMEOUT if clean else 1.0)
        except TimeoutError:
            if clean:
                process.kill()
                await process.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def arm(self, path: Path, device: tuple[int, int] | None = None) -> None:
        """The watchdog holds `path`'s file system (which must be `device`, if given) from now
        on; raises if it cannot."""
        message: dict[str, Any] = {"op": "arm", "path": str(path)}
        if device is not None:
            message["device"] = list(device)
        await self._request(message)

    async def disarm(self, path: Path) -> None:
        await self._request({"op": "disarm", "path": str(path)})

    async def _request(self, message: dict[str, Any]) -> None:
        process = self._process
        if process is None or process.stdin is None:
            raise CofferError("the thaw watchdog is not running")
        process.stdin.write(json.dumps(message).encode() + b"\n")
        await process.stdin.drain()
        try:
            reply = await asyncio.wait_for(self._replies.get(), START_TIMEOUT)
        except TimeoutError as exc:
            raise CofferError(f"the thaw watchdog did not answer {message['op']}") from exc
        if "error" in reply:
            raise CofferError(f"the thaw watchdog refused {message['op']}: {reply['error']}")

    async def _read(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        stdout = self._process.stdout
        while line := await stdout.readline():
            message = json.loads(line)
            if message.get("event") == "expired":
                self.expired_at = time.monotonic()
                self.thawed_by_watchdog = list(message.get("thawed", []))
            else:
                self._replies.put_nowait(message)
        # The watchdog is gone: a request waiting for an answer learns it.
        self._replies.put_nowait({"error": "the thaw watchdog exited"})


if __name__ == "__main__":
    sys.exit(main())
