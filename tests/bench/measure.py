"""Measuring one benchmark step: wall and CPU time, peak memory, and repository bytes.

Two ways to count a step's resources, one per shape of tool:

- a tool that runs as one child process per step (restic, borg, the `coffer` CLI): wall time
  around the child, its CPU time from `os.wait4`'s rusage of that child, and its peak RSS
  (see `run_child` for why not simply rusage's `ru_maxrss`);
- a long-lived process (the Coffer controller and agent): CPU from `/proc/PID/stat`
  (utime + stime, and cutime + cstime of children it reaped) before and after the step, peak
  RSS as `VmHWM` from `/proc/PID/status` after resetting it with `clear_refs` (5) first.

Bytes are allocated bytes (`st_blocks * 512`, as `du` counts them), not apparent sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class StepResult:
    """One tool's figures for one step (a backup or a restore)."""

    tool: str
    step: str
    image_bytes: int
    wall_s: float
    cpu_s: float
    peak_rss: int  # bytes; for Coffer the larger of controller and agent (both in `detail`)
    repo_bytes: int
    added_bytes: int
    ok: bool = True
    error: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.image_bytes / 1e6 / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mb_per_s"] = self.mb_per_s
        return out


@dataclass(frozen=True)
class ChildRun:
    """A finished child process and what it cost."""

    argv: list[str]
    returncode: int
    wall_s: float
    cpu_s: float
    max_rss: int  # bytes
    log: Path

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class StepFailed(RuntimeError):
    """A tool's step did not succeed."""


def run_child(
    argv: list[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdout: Path | None = None,
    timeout_s: float = 3600.0,
) -> ChildRun:
    """Run `argv` with output to `log`; return its wall time, CPU time and peak RSS.

    With `stdout`, standard output goes to that file instead (to be parsed) and only standard
    error to `log`. The child is reaped with `os.wait4`, whose rusage is that child's alone.
    Past `timeout_s` it is killed (and the run returns its non-zero status).

    Peak RSS: Linux carries the RSS a child had before `exec` into its `ru_maxrss`, and a child
    forked (or vforked) from this process starts with this process's resident set (hundreds
    of MiB after building an image). So `ru_maxrss` counts only when it is above this
    process's own peak at spawn time (then it can only be the tool's own peak); otherwise the
    peak is `VmHWM` of the exec'd program, read every 50 ms while it runs (the high-water mark
    only rises, so at most the last 50 ms of growth can be missed).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as err, (stdout or log).open("wb" if stdout else "ab") as out:
        err.write(f"$ {' '.join(argv)}\n".encode())
        err.flush()
        own_peak = proc_hwm_bytes(os.getpid())
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdout=out if stdout else err,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )
        timer = threading.Timer(timeout_s, _kill, (proc.pid,))
        timer.start()
        watcher = _HwmWatcher(proc.pid)
        watcher.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            watcher.stop()
            timer.cancel()
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    max_rss = usage.ru_maxrss * 1024
    return ChildRun(
        argv=list(argv),
        returncode=proc.returncode,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        max_rss=max_rss if max_rss > own_peak else watcher.peak,
        log=log,
    )


class _HwmWatcher(threading.Thread):
    """Polls a child's VmHWM (Popen returns only once the child has exec'd its program)."""

    def __init__(self, pid: int) -> None:
        super().__init__(name=f"hwm-{pid}", daemon=True)
        self.pid = pid
        self.peak = 0
        self._done = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                hwm = proc_hwm_bytes(self.pid)
            except OSError:
                hwm = 0
            with self._lock:
                # Once wait4 has reaped the child its pid may be someone else's: keep nothing.
                if not self._done.is_set():
                    self.peak = max(self.peak, hwm)
            self._done.wait(0.05)

    def stop(self) -> None:
        with self._lock:
            self._done.set()
        self.join()


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def allocated_bytes(path: Path) -> int:
    """Bytes allocated on disk to `path` and everything under it (what `du -s -B1` says)."""
    if not path.exists():
        return 0
    total = path.lstat().st_blocks * 512
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def drop_caches() -> None:
    """Write dirty pages out and empty the page cache, so the next step reads from disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def sequential_write_rate(path: Path, size: int, piece: int = 4 << 20) -> float:
    """Bytes a second this machine writes sequentially to a new file at `path`: `size` bytes
    of zeros (in `piece`s) with `dd oflag=direct conv=fdatasync`, as a restore writes a new
    image and syncs it. The file is removed. The bound a restore is measured against."""
    path.unlink(missing_ok=True)
    drop_caches()
    count = max(1, size // piece)
    argv = [
        "dd", "if=/dev/zero", f"of={path}", f"bs={piece}", f"count={count}",
        "oflag=direct", "conv=fdatasync", "status=none",
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        subprocess.run(argv, check=True)
        return count * piece / (time.perf_counter() - start)
    finally:
        path.unlink(missing_ok=True)


def sha256_file(path: Path, piece: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(piece):
            h.update(chunk)
    return h.hexdigest()


# -- long-lived processes --------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """CPU seconds used so far by `pid` (all its threads) and by children it has reaped."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / _TICK


def proc_hwm_bytes(pid: int) -> int:
    """Peak resident set (VmHWM) of `pid` since it started or since `reset_hwm`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def proc_rss_bytes(pid: int) -> int:
    """Current resident set (VmRSS) of `pid`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_hwm(pid: int) -> None:
    """Reset `pid`'s peak resident set to its current one (Linux >= 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5\n")


class ProcessWatch:
    """CPU seconds and peak RSS of some long-lived processes over one step."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self._cpu0: dict[str, float] = {}

    def __enter__(self) -> ProcessWatch:
        for name, pid in self.pids.items():
            reset_hwm(pid)
            self._cpu0[name] = proc_cpu_s(pid)
        return self

    def __exit__(self, *exc: object) -> None:
        # A process that died during the step has no /proc entry left: it counts as 0 here
        # and the step fails on the tool's own account.
        self.cpu_s: dict[str, float] = {}
        self.peak_rss: dict[str, int] = {}
        for name, pid in self.pids.items():
            try:
                self.cpu_s[name] = proc_cpu_s(pid) - self._cpu0[name]
                self.peak_rss[name] = proc_hwm_bytes(pid)
            except (FileNotFoundError, ProcessLookupError):
                self.cpu_s[name] = 0.0
                self.peak_rss[name] = 0


class Tool(Protocol):
    """A backup tool under benchmark: one repository, backups of one path, restores of it."""

    name: str

    def version(self) -> str:
        """The tool's version line."""
        ...

    def settings(self) -> str:
        """How it is configured here (compression, encryption, chunking), in one line."""
        ...

    def setup(self) -> None:
        """Create the repository (and start any process the tool needs)."""
        ...

    def backup(self, step: str) -> StepResult:
        """Back up the source path as a new snapshot named `step`."""
        ...

    def restore(self, step: str) -> tuple[StepResult, Path]:
        """Restore the latest snapshot to a new file; return the result and that file."""
        ...

    def get_file(self, step: str, file: Any) -> StepResult:
        """One small file of the latest snapshot to a new directory (a `single_file.SmallFile`;
        see `tests.bench.single_file`)."""
        ...

    def close(self) -> None:
        """Stop what `setup` started; the repository stays on disk."""
        ...


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'2G', '256M', '1M', '64K', '4096' (binary units; a trailing 'iB' or 'B' is allowed)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
