"""The lab: VMs made of Linux namespaces on one machine, for end-to-end tests and the demo.

What `up` builds (as root), everything named after the lab's `name` (default `coffer`):

- a bridge `{name}-lab0` in the root network namespace with the first address of the subnet
  (default 10.77.0.1/24): the controller and the broker listen there;
- a scratch XFS file system (made with reflink=1) in `{dir}/scratch.img`, loop-mounted on
  `{dir}/scratch`: it holds the VMs' disk images, so reflink snapshots work;
- per VM: an ext4 disk image `{dir}/scratch/{vm}.img` on its own loop device, and an init
  process (`vm_init.py`, PID 1 of the VM) in new network, mount, UTS and PID namespaces made
  by `unshare`: its hostname is the VM's name, it mounts the disk on `{dir}/vms/{vm}/disk`
  inside its own mount namespace only, and a veth pair joins its `eth0` (address
  10.77.0.(10+i)) to the bridge.

The VM's network namespace belongs to its init alone (no `ip netns` name), so it disappears
with the VM. `run`/`spawn` enter all four namespaces with `nsenter`. The state file
`{dir}/state.json` is written after every step, so `down` undoes a crashed `up`; `up` and
`down` are idempotent, and `down` leaves no namespace, veth, bridge, mount, loop device or
process behind. A recorded process is signalled only if its start time still matches, so a
reused PID is never killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

VM_INIT = Path(__file__).resolve().parent / "vm_init.py"
MiB = 1 << 20
NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")  # interface names are at most 15 characters
VM_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


class LabError(Exception):
    pass


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


# -- processes ------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from the state (field 3) on


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot), or None if it is gone or a zombie."""
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@dataclass
class Proc:
    """A process the lab started, known by PID and start time."""

    pid: int
    start: int

    @staticmethod
    def of(pid: int) -> Proc:
        started = start_time(pid)
        if started is None:
            raise LabError(f"process {pid} is gone")
        return Proc(pid, started)

    def alive(self) -> bool:
        return start_time(self.pid) == self.start

    def signal(self, signum: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


def _wait_child(parent: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = children(parent)
        if found:
            return found[0]
        if start_time(parent) is None:
            raise LabError(f"process {parent} exited before starting its child")
        time.sleep(0.01)
    raise LabError(f"process {parent} started no child within {timeout} s")


# -- loop devices and mounts ----------------------------------------------------------------


def loop_backing(device: str) -> str | None:
    path = Path("/sys/block") / Path(device).name / "loop" / "backing_file"
    try:
        return path.read_text().strip().removesuffix(" (deleted)")
    except OSError:
        return None


def loops_of(image: Path) -> list[str]:
    out = sh("losetup", "--noheadings", "--output", "NAME", "--associated", str(image)).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def mounted_at(path: Path, mountinfo: str = "/proc/self/mountinfo") -> bool:
    target = str(path)
    return any(line.split()[4] == target for line in Path(mountinfo).read_text().splitlines())


def link_exists(name: str) -> bool:
    return sh("ip", "link", "show", "dev", name, check=False).returncode == 0


# -- the lab --------------------------------------------------------------------------------


@dataclass
class VmState:
    name: str
    index: int
    address: str
    image: str
    mountpoint: str
    loop: str | None = None
    unshare: Proc | None = None
    init: Proc | None = None
    processes: dict[str, Proc] = field(default_factory=dict)  # by tag, e.g. "agent"

    @staticmethod
    def load(raw: dict[str, Any]) -> VmState:
        vm = VmState(**{k: v for k, v in raw.items() if k not in ("unshare", "init", "processes")})
        vm.unshare = Proc(**raw["unshare"]) if raw.get("unshare") else None
        vm.init = Proc(**raw["init"]) if raw.get("init") else None
        vm.processes = {tag: Proc(**p) for tag, p in raw.get("processes", {}).items()}
        return vm


@dataclass
class LabState:
    name: str
    subnet: str
    disk_mib: int
    scratch_mib: int
    scratch_loop: str | None = None
    bridge_made: bool = False
    vms: dict[str, VmState] = field(default_factory=dict)

    @staticmethod
    def load(raw: dict[str, Any]) -> LabState:
        state = LabState(**{k: v for k, v in raw.items() if k != "vms"})
        state.vms = {name: VmState.load(vm) for name, vm in raw.get("vms", {}).items()}
        return state


class Lab:
    """A lab under `directory`; settings come from its state file once it has been up."""

    def __init__(
        self,
        directory: Path,
        *,
        name: str = "coffer",
        subnet: str = "10.77.0.0/24",
        disk_mib: int = 256,
        scratch_mib: int = 1024,
    ) -> None:
        self.dir = directory.resolve()
        self.state_file = self.dir / "state.json"
        if self.state_file.exists():
            self.state = LabState.load(json.loads(self.state_file.read_text()))
        else:
            if not NAME.match(name):
                raise LabError(f"lab name {name!r}: 1-8 lower-case letters and digits")
            ipaddress.ip_network(subnet)
            self.state = LabState(name, subnet, disk_mib, scratch_mib)
        self._popens: list[subprocess.Popen[bytes]] = []  # ours to reap

    # -- names --------------------------------------------------------------------------

    @property
    def bridge(self) -> str:
        return f"{self.state.name}-lab0"

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.state.subnet)

    @property
    def bridge_address(self) -> str:
        return str(self.network.network_address + 1)

    @property
    def scratch_image(self) -> Path:
        return self.dir / "scratch.img"

    @property
    def scratch(self) -> Path:
        return self.dir / "scratch"

    def veth(self, vm: VmState) -> str:
        return f"{self.state.name}-v{vm.index}"

    def vm(self, name: str) -> VmState:
        try:
            return self.state.vms[name]
        except KeyError:
            raise LabError(f"no VM {name!r} in this lab ({', '.join(self.state.vms)})") from None

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.state), indent=2) + "\n")
        tmp.replace(self.state_file)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # -- up -----------------------------------------------------------------------------

    def up(self, vms: Sequence[str]) -> None:
        """Build what is missing of the lab with these VMs (added to those it has)."""
        for name in vms:
            if not VM_NAME.match(name):
                raise LabError(f"VM name {name!r}: lower-case letters, digits and dashes")
        with self._locked():
            self._bridge_up()
            self._scratch_up()
            for name in vms:
                if name not in self.state.vms:
                    index = len(self.state.vms) + 1
                    address = self.network.network_address + 10 + index
                    self.state.vms[name] = VmState(
                        name=name,
                        index=index,
                        address=str(address),
                        image=str(self.scratch / f"{name}.img"),
                        mountpoint=str(self.dir / "vms" / name / "disk"),
                    )
                    self.save()
            for vm in self.state.vms.values():
                self._vm_up(vm)

    def _bridge_up(self) -> None:
        if not link_exists(self.bridge):
            sh("ip", "link", "add", self.bridge, "type", "bridge")
            self.state.bridge_made = True
            self.save()
            sh("ip", "addr", "add", f"{self.bridge_address}/{self.network.prefixlen}",
               "dev", self.bridge)  # fmt: skip
        sh("ip", "link", "set", self.bridge, "up")

    def _scratch_up(self) -> None:
        if not self.scratch_image.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            with self.scratch_image.open("wb") as f:
                f.truncate(self.state.scratch_mib * MiB)
            sh("mkfs.xfs", "-q", "-m", "reflink=1", str(self.scratch_image))
        attached = loops_of(self.scratch_image)
        if attached:
            self.state.scratch_loop = attached[0]
        else:
            self.state.scratch_loop = sh("losetup", "--find", "--show",
                                         str(self.scratch_image)).stdout.strip()  # fmt: skip
        self.save()
        self.scratch.mkdir(exist_ok=True)
        if not mounted_at(self.scratch):
            sh("mount", self.state.scratch_loop, str(self.scratch))

    def _vm_up(self, vm: VmState) -> None:
        image = Path(vm.image)
        if not image.exists():
            with image.open("wb") as f:
                f.truncate(self.state.disk_mib * MiB)
            sh("mkfs.ext4", "-q", "-F", "-L", vm.name, str(image))
        attached = loops_of(image)
        vm.loop = attached[0] if attached else sh("losetup", "--find", "--show",
                                                   str(image)).stdout.strip()  # fmt: skip
        self.save()
        Path(vm.mountpoint).mkdir(parents=True, exist_ok=True)
        if vm.init is None or not vm.init.alive():
            self._start_init(vm)
        if not link_exists(self.veth(vm)):
            self._wire(vm)

    def _start_init(self, vm: VmState) -> None:
        assert vm.loop is not None
        log = self.dir / "vms" / vm.name / "init.log"
        with log.open("w") as out:
            popen = subprocess.Popen(
                [
                    "unshare",
                    "--fork",
                    "--pid",
                    "--mount-proc",
                    "--mount",
                    "--uts",
                    "--net",
                    "--propagation",
                    "private",
                    sys.executable,
                    str(VM_INIT),
                    "--hostname",
                    vm.name,
                    "--device",
                    vm.loop,
                    "--mountpoint",
                    vm.mountpoint,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._popens.append(popen)
        vm.unshare = Proc.of(popen.pid)
        vm.init = Proc.of(_wait_child(popen.pid))
        vm.processes = {}
        self.save()
        deadline = time.monotonic() + 20
        while "ready" not in log.read_text():
            if popen.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"VM {vm.name} did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.02)

    def _wire(self, vm: VmState) -> None:
        assert vm.init is not None
        host, peer = self.veth(vm), f"{self.state.name}-p{vm.index}"
        sh("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", peer, "netns", str(vm.init.pid))
        sh("ip", "link", "set", host, "master", self.bridge, "up")
        inside = ["nsenter", "--target", str(vm.init.pid), "--net"]
        sh(*inside, "ip", "link", "set", "lo", "up")
        sh(*inside, "ip", "link", "set", peer, "name", "eth0")
        sh(*inside, "ip", "addr", "add", f"{vm.address}/{self.network.prefixlen}", "dev", "eth0")
        sh(*inside, "ip", "link", "set", "eth0", "up")

    # -- inside a VM --------------------------------------------------------------------

    def _enter(self, vm: VmState, cwd: str | None) -> list[str]:
        if vm.init is None or not vm.init.alive():
            raise LabError(f"VM {vm.name} is not running (lab up?)")
        return ["nsenter", "--target", str(vm.init.pid), "--net", "--mount", "--uts", "--pid",
                f"--wd={cwd or os.getcwd()}"]  # fmt: skip

    def run(
        self, name: str, argv: Sequence[str], *, timeout: float = 60, cwd: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the VM and wait for it."""
        return subprocess.run(
            [*self._enter(self.vm(name), cwd), *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        tag: str | None = None,
        log: Path | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> int:
        """Start a command inside the VM in the background; its PID (as the host sees it).
        With a `tag` (e.g. "agent") the lab remembers it for `kill`."""
        vm = self.vm(name)
        out = log.open("ab") if log else None
        try:
            popen = subprocess.Popen(
                [*self._enter(vm, cwd), *argv],
                stdin=subprocess.DEVNULL,
                stdout=out or subprocess.DEVNULL,
                stderr=subprocess.STDOUT if out else subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        finally:
            if out:
                out.close()
        self._popens.append(popen)
        pid = _wait_child(popen.pid)  # nsenter forks into the VM's PID namespace
        if tag:
            with self._locked():
                vm.processes[tag] = Proc.of(pid)
                self.save()
        return pid

    def kill(self, name: str, tag: str = "agent", signum: int = signal.SIGKILL) -> int:
        """Signal the VM's process tagged `tag`; its PID."""
        vm = self.vm(name)
        proc = vm.processes.get(tag)
        if proc is None or not proc.alive():
            raise LabError(f"VM {name} has no running process tagged {tag!r}")
        proc.signal(signum)
        return proc.pid

    def cut(self, name: str) -> None:
        """Take the VM off the network: its link goes down."""
        sh("ip", "link", "set", self.veth(self.vm(name)), "down")

    def restore(self, name: str) -> None:
        sh("ip", "link", "set", self.veth(self.vm(name)), "up")

    # -- down ---------------------------------------------------------------------------

    def down(self, *, keep_images: bool = False) -> None:
        with self._locked():
            for vm in self.state.vms.values():
                self._vm_down(vm)
            if mounted_at(self.scratch):
                _umount(self.scratch)
            self._detach(self.state.scratch_loop, self.scratch_image)
            self.state.scratch_loop = None
            self.save()
            if self.state.bridge_made and link_exists(self.bridge):
                sh("ip", "link", "delete", self.bridge)
            self.state.bridge_made = False
            for popen in self._popens:
                popen.wait(10)
            self._popens.clear()
            if keep_images:
                self.state.vms = {}
                self.save()
            else:
                for leftover in (self.scratch_image, self.state_file):
                    leftover.unlink(missing_ok=True)
                for directory in (self.scratch, self.dir / "vms"):
                    shutil.rmtree(directory, ignore_errors=True)
        if not keep_images:
            (self.dir / ".lock").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.dir.rmdir()

    def _vm_down(self, vm: VmState) -> None:
        for init in (vm.init, vm.unshare):
            if init is not None:
                init.signal(signal.SIGTERM)
                if not init.wait_gone(10):
                    init.signal(signal.SIGKILL)
                    if not init.wait_gone(10):
                        raise LabError(f"VM {vm.name}: process {init.pid} does not end")
        for proc in vm.processes.values():
            proc.wait_gone(10)  # ended with the VM's PID namespace
        vm.init = vm.unshare = None
        vm.processes = {}
        self.save()
        if link_exists(self.veth(vm)):  # gone with the namespace, normally
            sh("ip", "link", "delete", self.veth(vm))
        self._detach(vm.loop, Path(vm.image))
        vm.loop = None
        self.save()

    @staticmethod
    def _detach(device: str | None, image: Path) -> None:
        """Detach the loop device if it still holds `image` (a reused device is left alone)."""
        if device is None or loop_backing(device) != str(image):
            return
        sh("losetup", "--detach", device, check=False)
        deadline = time.monotonic() + 10
        while loop_backing(device) == str(image):  # busy until the last mount of it is gone
            if time.monotonic() > deadline:
                raise LabError(f"loop device {device} for {image} is still attached")
            time.sleep(0.05)

    # -- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        vms = {}
        for vm in self.state.vms.values():
            running = vm.init is not None and vm.init.alive()
            link = None
            if link_exists(self.veth(vm)):
                shown = sh("ip", "-json", "link", "show", "dev", self.veth(vm)).stdout
                link = "up" if "UP" in json.loads(shown)[0].get("flags", []) else "down"
            vms[vm.name] = {
                "running": running,
                "init_pid": vm.init.pid if vm.init else None,
                "address": vm.address,
                "link": link,
                "disk": vm.image,
                "loop": vm.loop,
                "mountpoint": vm.mountpoint,
                "disk_mounted": running
                and vm.init is not None
                and mounted_at(Path(vm.mountpoint), f"/proc/{vm.init.pid}/mountinfo"),
                "processes": {
                    tag: {"pid": p.pid, "alive": p.alive()} for tag, p in vm.processes.items()
                },
            }
        return {
            "dir": str(self.dir),
            "bridge": self.bridge if link_exists(self.bridge) else None,
            "bridge_address": self.bridge_address,
            "scratch": str(self.scratch) if mounted_at(self.scratch) else None,
            "vms": vms,
        }


def _umount(path: Path) -> None:
    for attempt in range(40):
        done = sh("umount", str(path), check=False)
        if done.returncode == 0:
            return
        if attempt == 39:
            raise LabError(f"umount {path}: {done.stderr.strip()}")
        time.sleep(0.25)
