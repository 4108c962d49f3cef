"""`python -m deploy.lab`: build, inspect and take down the lab of namespace VMs (as root).

    python -m deploy.lab up --vms 3             # vm1..vm3 (or: up web-1 db-1)
    python -m deploy.lab status
    python -m deploy.lab run vm1 -- hostname
    python -m deploy.lab spawn vm1 --tag agent --log /tmp/a.log -- coffer-agent --config ...
    python -m deploy.lab kill-agent vm1         # SIGKILL the process tagged "agent"
    python -m deploy.lab cut vm1                # link down; `restore vm1` brings it back
    python -m deploy.lab down                   # idempotent; leaves nothing behind

`--dir` (default /var/lib/coffer-lab, or $COFFER_LAB_DIR) holds the state file, the scratch
XFS image and the VMs' disks; `--name` and `--subnet` apply when the lab is first built.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from deploy.lab.lab import Lab, LabError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.lab",
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--dir", type=Path, default=Path(os.environ.get("COFFER_LAB_DIR", "/var/lib/coffer-lab"))
    )
    parser.add_argument("--name", default="coffer", help="prefix of interface names (1-8 chars)")
    parser.add_argument("--subnet", default="10.77.0.0/24")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="build the lab (idempotent)")
    up.add_argument("vms", nargs="*", help="VM names (default: vm1..vmN)")
    up.add_argument("--vms", dest="count", type=int, default=None, help="how many VMs")
    up.add_argument("--disk-mib", type=int, default=256)
    up.add_argument("--scratch-mib", type=int, default=1024)
    down = commands.add_parser("down", help="take everything down (idempotent)")
    down.add_argument("--keep-images", action="store_true")
    commands.add_parser("status", help="what is up, as JSON")
    for name, text in (("cut", "take a VM off the network"), ("restore", "bring it back")):
        commands.add_parser(name, help=text).add_argument("vm")
    kill = commands.add_parser("kill-agent", help="SIGKILL a VM's process tagged agent")
    kill.add_argument("vm")
    kill.add_argument("--tag", default="agent")
    run = commands.add_parser("run", help="run a command inside a VM")
    run.add_argument("vm")
    run.add_argument("argv", nargs=argparse.REMAINDER)
    spawn = commands.add_parser("spawn", help="start a command inside a VM in the background")
    spawn.add_argument("vm")
    spawn.add_argument("--tag")
    spawn.add_argument("--log", type=Path)
    spawn.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    if os.geteuid() != 0:
        print("the lab needs root (namespaces, loop devices, mounts)", file=sys.stderr)
        return 2
    try:
        if args.command == "up":
            lab = Lab(
                args.dir,
                name=args.name,
                subnet=args.subnet,
                disk_mib=args.disk_mib,
                scratch_mib=args.scratch_mib,
            )
            names = args.vms or [f"vm{i}" for i in range(1, (args.count or 2) + 1)]
            lab.up(names)
            print(json.dumps(lab.status(), indent=2))
            return 0
        lab = Lab(args.dir, name=args.name, subnet=args.subnet)
        if args.command == "down":
            lab.down(keep_images=args.keep_images)
        elif args.command == "status":
            print(json.dumps(lab.status(), indent=2))
        elif args.command == "cut":
            lab.cut(args.vm)
        elif args.command == "restore":
            lab.restore(args.vm)
        elif args.command == "kill-agent":
            print(lab.kill(args.vm, args.tag, signal.SIGKILL))
        elif args.command == "run":
            command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            done = lab.run(args.vm, command, timeout=3600)
            sys.stdout.write(done.stdout)
            sys.stderr.write(done.stderr)
            return done.returncode
        elif args.command == "spawn":
            command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            print(lab.spawn(args.vm, command, tag=args.tag, log=args.log))
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
