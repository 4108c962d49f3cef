"""`python -m deploy.vm`: build the guest image, and start, inspect and stop QEMU guests (as root).

    python -m deploy.vm build                       # cached; --force builds again
    python -m deploy.lab up --vms 1                 # a bridge (coffer-lab0, 10.77.0.1/24)
    python -m deploy.vm start web-1 --dir /var/lib/coffer-vm/web-1 \\
        --bridge coffer-lab0 --address 10.77.0.50/24 \\
        --agent-config agent.toml --enrol-token-file web-1.token \\
        --enrol-address 10.77.0.1:7444  # the guest enrols at first boot
    python -m deploy.vm status --dir /var/lib/coffer-vm/web-1
    python -m deploy.vm exec --dir /var/lib/coffer-vm/web-1 -- coffer-agent doctor \\
        --config /etc/coffer-agent/agent.toml
    python -m deploy.vm console --dir /var/lib/coffer-vm/web-1 [--follow]
    python -m deploy.vm stop --dir /var/lib/coffer-vm/web-1

`start --root IMG --data IMG` boots from copies of those disks (e.g. restored ones) instead of
the image's. The guest enrols at first boot with the token of `coffer enrol create --vm NAME`
(`--enrol-token-file`, a file holding it, kept out of the process list, and `--enrol-address`,
the controller's enrol_listen as the guest reaches it); `--tls DIR` writes a `coffer pki
issue-agent` bundle in instead. `--accel kvm` (or $COFFER_VM_ACCEL) where /dev/kvm runs stock
kernels; tcg otherwise. The image cache is /var/cache/coffer-vm (or $COFFER_VM_CACHE).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from deploy.vm.errors import VmError
from deploy.vm.guest import ACCELERATORS, Guest, GuestSpec, accelerator
from deploy.vm.image import DEFAULT_CACHE, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.vm",
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="build the guest image unless it is cached")
    b.add_argument("--mirror", help="Debian archive (default: the one this machine's apt uses)")
    b.add_argument("--force", action="store_true")
    s = commands.add_parser("start", help="prepare a guest's disks and boot it")
    s.add_argument("name")
    s.add_argument("--dir", type=Path, required=True)
    s.add_argument("--bridge", required=True, help="an existing bridge for the guest's tap")
    s.add_argument("--address", required=True, help="the guest's ADDRESS/PREFIX on it")
    s.add_argument("--accel", choices=ACCELERATORS,
                   default=os.environ.get("COFFER_VM_ACCEL", "tcg"))  # fmt: skip
    s.add_argument("--cpus", type=int, default=2)
    s.add_argument("--memory-mib", type=int, default=1024)
    s.add_argument("--agent-config", type=Path, help="becomes /etc/coffer-agent/agent.toml")
    s.add_argument("--tls", type=Path, help="a `coffer pki issue-agent` bundle directory")
    s.add_argument("--enrol-token-file", type=Path,
                   help="a file holding a `coffer enrol create` token: the guest enrols at "
                   "first boot (its key is made inside it)")  # fmt: skip
    s.add_argument("--enrol-address", help="the controller's enrol_listen as the guest reaches it")
    s.add_argument("--root", type=Path, help="boot from a copy of this root disk image")
    s.add_argument("--data", type=Path, help="and of this data disk image")
    s.add_argument("--wait", type=float, default=180, help="seconds to wait for the boot")
    for name, text in (("stop", "shut a guest down"), ("status", "a guest's state as JSON"),
                       ("console", "print its serial console")):  # fmt: skip
        c = commands.add_parser(name, help=text)
        c.add_argument("--dir", type=Path, required=True)
        if name == "console":
            c.add_argument("--follow", action="store_true")
    e = commands.add_parser("exec", help="run a command in the guest (qemu-guest-agent)")
    e.add_argument("--dir", type=Path, required=True)
    e.add_argument("--timeout", type=float, default=120)
    e.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    if os.geteuid() != 0:
        print("guests need root (tap devices, the image build)", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except VmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "build":
        build(args.cache, mirror=args.mirror, force=args.force)
        return 0
    if args.command == "start":
        image = build(args.cache)
        spec = GuestSpec(args.name, args.dir.absolute(), args.bridge, args.address,
                         accelerator(args.accel), args.cpus, args.memory_mib)  # fmt: skip
        guest = Guest(spec)
        files: dict[str, bytes | Path] = {}
        if args.agent_config:
            files["/etc/coffer-agent/agent.toml"] = args.agent_config
        if args.tls:
            for f in sorted(args.tls.iterdir()):
                files[f"/etc/coffer-agent/tls/{f.name}"] = f
        if args.enrol_token_file:
            if not args.enrol_address:
                raise VmError("--enrol-token-file needs --enrol-address (the controller's "
                              "enrol_listen as the guest reaches it)")  # fmt: skip
            token = args.enrol_token_file.read_text().strip()
            files["/etc/coffer-agent/enrol.env"] = (
                f"COFFER_ENROL_TOKEN={token}\nCOFFER_ENROL_ADDRESS={args.enrol_address}\n"
            ).encode()
        guest.prepare(image, root=args.root, data=args.data, files=files)
        guest.start(image)
        seconds = guest.wait_agent(args.wait)
        print(json.dumps({**guest.status(), "boot_seconds": round(seconds, 1)}, indent=2))
        return 0
    guest = Guest.at(args.dir)
    if args.command == "stop":
        guest.stop()
    elif args.command == "status":
        print(json.dumps(guest.status(), indent=2))
    elif args.command == "console":
        seen = 0
        while True:
            text = guest.console_text()
            sys.stdout.write(text[seen:])
            sys.stdout.flush()
            seen = len(text)
            if not args.follow or not guest.running():
                return 0
            time.sleep(0.5)
    elif args.command == "exec":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        done = guest.exec(argv, timeout=args.timeout, check=False)
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
        return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
