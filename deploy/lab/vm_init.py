"""PID 1 of a lab VM: names the VM, mounts its disk in the VM's own mount namespace, reaps.

Started by the lab as `unshare --fork --pid --mount-proc --mount --uts --net python3 vm_init.py
--hostname NAME --device /dev/loopN --mountpoint DIR`. Standard library only. It prints
`ready` once the disk is mounted. On SIGTERM it unmounts the disk and exits, which ends every
process of the VM (the kernel kills a PID namespace with its init).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType


class _Stop(Exception):
    """SIGTERM: end the VM."""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--mountpoint", required=True)
    args = parser.parse_args()

    socket.sethostname(args.hostname)
    # A fresh sysfs shows this network namespace's interfaces under /sys/class/net.
    subprocess.run(["mount", "-t", "sysfs", "sysfs", "/sys"], check=False)
    subprocess.run(["mount", args.device, args.mountpoint], check=True)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    try:
        while True:
            try:
                os.waitpid(-1, 0)  # orphans of the VM are ours to reap
            except ChildProcessError:
                time.sleep(0.2)
    except _Stop:
        pass
    # Everything else in the VM dies with this process. First asked (SIGTERM): an agent's thaw
    # watchdog thaws what it holds when told to stop; then the disk is thawed in any case (a
    # frozen file system would pin its loop device after the unmount), then the rest is
    # killed and the disk unmounted, while nothing can write to it any more.
    for pid in _others():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while _alive(_others()) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.05)
    _thaw(args.mountpoint)
    for pid in _others():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    subprocess.run(["umount", "--lazy", args.mountpoint], check=False)
    return 0


GRACE_SECONDS = 2.0
FITHAW = 0xC0045878


def _thaw(mountpoint: str) -> None:
    """FITHAW the VM's disk; not frozen (EINVAL) or not there is fine."""
    with contextlib.suppress(OSError):
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, FITHAW, 0)
        finally:
            os.close(fd)


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _alive(pids: list[int]) -> bool:
    """Whether any of `pids` still runs (a zombie does not)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return True
    return False


def _others() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != 1]


if __name__ == "__main__":
    sys.exit(main())
