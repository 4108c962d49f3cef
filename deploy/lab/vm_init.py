"""PID 1 of a lab VM: names the VM, mounts its disk in the VM's own mount namespace, reaps.

Started by the lab as `unshare --fork --pid --mount-proc --mount --uts --net python3 vm_init.py
--hostname NAME --device /dev/loopN --mountpoint DIR`. Standard library only. It prints
`ready` once the disk is mounted. On SIGTERM it unmounts the disk and exits, which ends every
process of the VM (the kernel kills a PID namespace with its init).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
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
    # Everything else in the VM dies with this process; the disk is unmounted first, while
    # nothing can write to it any more.
    for pid in _others():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    subprocess.run(["umount", "--lazy", args.mountpoint], check=False)
    return 0


def _others() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != 1]


if __name__ == "__main__":
    sys.exit(main())
