"""A QEMU guest run from the cached image: its disks, its process, its console and its commands.

A guest lives in one directory (`GuestSpec.directory`):

- `root.img`: its root disk, a sparse copy of the image's (or a restored image given to
  `prepare`); `data.img`: its data disk (ext4, made on first `prepare`), mounted on `/data`.
  Both are raw virtio disks, `/dev/vda` and `/dev/vdb` in the guest.
- what makes it this VM is written into its root file system before boot, with `debugfs`
  (no mount, no loop device): `/etc/hostname` and, for the agent, `/etc/coffer-agent/agent.toml`
  and its one-time enrolment token in `/etc/coffer-agent/enrol.env` (the image's
  coffer-enrol.service enrols at first boot; or a `coffer pki issue-agent` bundle in
  `/etc/coffer-agent/tls`). A guest booted from restored disks needs none of it: its identity
  is on them.
- `console.log`: the serial console; `qga.sock`: qemu-guest-agent's channel, through which
  `exec` runs a command in the guest; `qmp.sock`: QEMU's monitor; `state.json`: the QEMU
  process (PID and start time, so a reused PID is never signalled) and the tap device.

Network: a tap device (named after the directory) joined to a bridge the caller made, e.g. the
lab's bridge where the controller listens; the guest's eth0 address comes from the kernel
command line (`coffer.ip=`). The guest has no route and no DNS: it reaches the bridge only.

Accelerator: `tcg` (QEMU's emulator, `-accel tcg,thread=multi -cpu max`) works everywhere;
`kvm` (`-accel kvm -cpu host`) where /dev/kvm runs a stock kernel (docs/vm-guest.md says why
this machine's does not). Nothing else is accepted.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from deploy.lab.lab import Proc
from deploy.vm.errors import VmError
from deploy.vm.image import Image, run

Accel = Literal["tcg", "kvm"]
ACCELERATORS: tuple[str, ...] = get_args(Accel)
QGA_PORT = "org.qemu.guest_agent.0"


def accelerator(value: str) -> Accel:
    """`value` as an accelerator name; VmError for anything but tcg or kvm."""
    if value == "tcg":
        return "tcg"
    if value == "kvm":
        return "kvm"
    raise VmError(f"accelerator {value!r} is not one of {', '.join(ACCELERATORS)}")


@dataclass(frozen=True)
class GuestSpec:
    """How a guest is run: its name, its directory, where its NIC goes and what it gets."""

    name: str
    directory: Path
    bridge: str  # an existing bridge the guest's tap joins
    address: str  # the guest's eth0, ADDRESS/PREFIX on the bridge's subnet
    accel: Accel = "tcg"
    cpus: int = 2
    memory_mib: int = 1024
    data_mib: int = 64

    @property
    def tap(self) -> str:
        digest = hashlib.sha256(str(self.directory.absolute()).encode()).hexdigest()
        return f"cvm{digest[:10]}"  # interface names are at most 15 characters

    @property
    def mac(self) -> str:
        digest = hashlib.sha256(self.name.encode()).digest()
        return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


class Guest:
    """One guest: `prepare` its disks, `start`, `exec` commands in it, `stop`."""

    def __init__(self, spec: GuestSpec) -> None:
        self.spec = spec
        self.dir = spec.directory

    @staticmethod
    def at(directory: Path) -> Guest:
        """The guest whose directory this is, as it was last started."""
        try:
            fields = json.loads((directory / "spec.json").read_text())
        except FileNotFoundError:
            raise VmError(f"{directory} holds no guest") from None
        fields["directory"] = directory
        fields["accel"] = accelerator(fields["accel"])
        return Guest(GuestSpec(**fields))

    @property
    def root(self) -> Path:
        return self.dir / "root.img"

    @property
    def data(self) -> Path:
        return self.dir / "data.img"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def qga(self) -> Path:
        return self.dir / "qga.sock"

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    # -- disks ------------------------------------------------------------------------------

    def prepare(
        self,
        image: Image,
        *,
        root: Path | None = None,
        data: Path | None = None,
        files: Mapping[str, bytes | Path] | None = None,
    ) -> None:
        """The guest's disks: copies of `root`/`data` (default: the image's root and an empty
        ext4 data disk) unless it has them already; then `files` (guest path: content or a
        host file) written into its root file system."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.running():
            raise VmError(f"guest {self.spec.name} is running; stop it first")
        if not self.root.exists() or root is not None:
            run("cp", "--sparse=always", "--reflink=auto", root or image.root, self.root)
        if data is not None:
            run("cp", "--sparse=always", "--reflink=auto", data, self.data)
        elif not self.data.exists():
            with self.data.open("wb") as f:
                f.truncate(self.spec.data_mib << 20)
            run("mkfs.ext4", "-q", "-F", "-L", "coffer-data", self.data)
        if root is None:  # a restored disk is left as it was restored
            files = {"/etc/hostname": f"{self.spec.name}\n".encode(), **(files or {})}
        if files:
            write_files(self.root, files)

    # -- the process ------------------------------------------------------------------------

    def argv(self, image: Image) -> list[str]:
        spec = self.spec
        accel = ["-accel", "tcg,thread=multi", "-cpu", "max"]
        if spec.accel == "kvm":
            accel = ["-accel", "kvm", "-cpu", "host"]
        cmdline = (f"root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=-1 "
                   f"coffer.ip={spec.address}")  # fmt: skip
        return [
            "qemu-system-x86_64", "-name", spec.name, "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-machine", "q35", *accel,
            "-smp", str(spec.cpus), "-m", str(spec.memory_mib),
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
            "-drive", f"file={self.root},format=raw,if=virtio,cache=writeback",
            "-drive", f"file={self.data},format=raw,if=virtio,cache=writeback",
            "-netdev", f"tap,id=net0,ifname={spec.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=net0,mac={spec.mac}",
            "-chardev", f"file,id=serial0,path={self.console}", "-serial", "chardev:serial0",
            "-chardev", f"socket,id=qga0,path={self.qga},server=on,wait=off",
            "-device", "virtio-serial-pci",
            "-device", f"virtserialport,chardev=qga0,name={QGA_PORT}",
            "-qmp", f"unix:{self.qmp},server=on,wait=off",
        ]  # fmt: skip

    def start(self, image: Image) -> int:
        """Boot the guest (its disks prepared); QEMU's PID. Returns once QEMU runs."""
        if self.running():
            raise VmError(f"guest {self.spec.name} is already running")
        if self.spec.accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise VmError("accelerator kvm needs /dev/kvm")
        if len(str(self.qmp)) > 100:
            raise VmError(f"{self.dir} is too long a path for the guest's sockets")
        for sock in (self.qga, self.qmp):
            sock.unlink(missing_ok=True)
        self.console.write_bytes(b"")
        run("ip", "tuntap", "add", "dev", self.spec.tap, "mode", "tap")
        spec = {k: v for k, v in vars(self.spec).items() if k != "directory"}
        (self.dir / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
        state: dict[str, Any] = {"name": self.spec.name, "tap": self.spec.tap}
        self._save(state)
        run("ip", "link", "set", self.spec.tap, "master", self.spec.bridge, "up")
        with (self.dir / "qemu.log").open("ab") as log:
            popen = subprocess.Popen(self.argv(image), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        proc = Proc.of(popen.pid)
        state["qemu"] = {"pid": proc.pid, "start": proc.start}
        state["started"] = time.time()
        self._save(state)
        time.sleep(0.2)
        if popen.poll() is not None:
            self.stop()
            raise VmError(f"qemu exited at once: {(self.dir / 'qemu.log').read_text()[-2000:]}")
        return proc.pid

    def _save(self, state: Mapping[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.rename(self.state_file)

    def _state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        return state

    def _proc(self) -> Proc | None:
        qemu = self._state().get("qemu")
        return Proc(qemu["pid"], qemu["start"]) if qemu else None

    def running(self) -> bool:
        proc = self._proc()
        return proc is not None and proc.alive()

    def status(self) -> dict[str, Any]:
        state = self._state()
        state["running"] = self.running()
        state["directory"] = str(self.dir)
        return state

    def stop(self, timeout: float = 60) -> None:
        """Shut the guest down (ACPI-less: through its guest agent), QEMU ended by force if it
        does not exit within `timeout`; the tap removed. Idempotent."""
        proc = self._proc()
        if proc is not None and proc.alive():
            with contextlib.suppress(VmError, OSError):
                self.request("guest-shutdown", {"mode": "powerdown"}, timeout=5, reply=False)
            if not proc.wait_gone(timeout):
                proc.signal(signal.SIGTERM)
                if not proc.wait_gone(10):
                    proc.signal(signal.SIGKILL)
                    proc.wait_gone(10)
        state = self._state()
        tap = state.get("tap")
        if tap and Path(f"/sys/class/net/{tap}").exists():
            run("ip", "link", "del", tap)
        if state:
            state.pop("qemu", None)
            state.pop("tap", None)
            self._save(state)

    def kill(self) -> None:
        """End QEMU at once (a power cut), the tap removed."""
        proc = self._proc()
        if proc is not None:
            proc.signal(signal.SIGKILL)
            proc.wait_gone(10)
        self.stop()

    # -- the console ------------------------------------------------------------------------

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, text: str, timeout: float) -> float:
        """Wait until the serial console shows `text`; seconds since the guest started."""
        deadline = time.monotonic() + timeout
        while text not in self.console_text():
            if not self.running():
                raise VmError(f"guest {self.spec.name} ended:\n{self.console_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise VmError(f"guest {self.spec.name} did not print {text!r} in {timeout} s:\n"
                              f"{self.console_text()[-3000:]}")  # fmt: skip
            time.sleep(0.2)
        return time.time() - float(self._state().get("started", time.time()))

    # -- commands through qemu-guest-agent ----------------------------------------------------

    def request(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                timeout: float = 30, reply: bool = True) -> Any:  # fmt: skip
        """One qemu-guest-agent command; its `return` value."""
        sync = int.from_bytes(os.urandom(4), "big") >> 1
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.qga))
            stream = sock.makefile("rwb")
            # guest-sync first: what an earlier, abandoned request left in the channel is
            # read and dropped up to the reply carrying our id.
            stream.write(json.dumps({"execute": "guest-sync", "arguments": {"id": sync}})
                         .encode() + b"\n")  # fmt: skip
            stream.flush()
            while True:
                line = stream.readline()
                if not line:
                    raise VmError("qemu-guest-agent closed the channel")
                with contextlib.suppress(ValueError):
                    if json.loads(line.strip(b"\xff")).get("return") == sync:
                        break
            body: dict[str, Any] = {"execute": command}
            if arguments:
                body["arguments"] = dict(arguments)
            stream.write(json.dumps(body).encode() + b"\n")
            stream.flush()
            if not reply:
                return None
            answer = json.loads(stream.readline())
        if "error" in answer:
            raise VmError(f"{command}: {answer['error'].get('desc', answer['error'])}")
        return answer.get("return")

    def wait_agent(self, timeout: float) -> float:
        """Wait until qemu-guest-agent answers in the guest; seconds since the guest started."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.request("guest-ping", timeout=3)
                break
            except (OSError, VmError, ValueError) as exc:
                if not self.running():
                    raise VmError(f"guest {self.spec.name} ended:\n"
                                  f"{self.console_text()[-3000:]}") from exc  # fmt: skip
                if time.monotonic() > deadline:
                    raise VmError(f"qemu-guest-agent of {self.spec.name} silent for {timeout} s:"
                                  f"\n{self.console_text()[-3000:]}") from exc  # fmt: skip
                time.sleep(0.5)
        return time.time() - float(self._state().get("started", time.time()))

    def exec(self, argv: Sequence[str], *, timeout: float = 60,
             check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run `argv` in the guest as root; its exit status and output."""
        pid = self.request("guest-exec", {"path": argv[0], "arg": list(argv[1:]),
                                          "capture-output": True})["pid"]  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            status = self.request("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                break
            if time.monotonic() > deadline:
                raise VmError(f"{' '.join(argv)} still runs in {self.spec.name} after {timeout} s")
            time.sleep(0.2)
        out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
        err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
        done = subprocess.CompletedProcess(list(argv), int(status.get("exitcode", -1)), out, err)
        if check and done.returncode != 0:
            raise VmError(f"{' '.join(argv)} in {self.spec.name}: exit {done.returncode}: "
                          f"{(err or out).strip()[-2000:]}")  # fmt: skip
        return done

    def read(self, path: str, *, timeout: float = 60) -> str:
        """A text file of the guest."""
        return self.exec(["/bin/cat", path], timeout=timeout).stdout


def write_files(image: Path, files: Mapping[str, bytes | Path]) -> None:
    """Write `files` (guest path: content or host file) into the ext4 file system `image`,
    with debugfs, making parent directories; then read each back to prove it is there."""
    with tempfile.TemporaryDirectory(prefix="coffer-vm-") as tmp:
        commands = []
        made: set[str] = set()
        for index, (dest, content) in enumerate(sorted(files.items())):
            source = Path(tmp) / str(index)
            if isinstance(content, Path):
                shutil.copyfile(content, source)
                source.chmod(content.stat().st_mode & 0o777)
            else:
                source.write_bytes(content)
                secret = "/tls/" in dest or dest.endswith((".toml", ".env"))
                source.chmod(0o600 if secret else 0o644)
            parts = Path(dest).parent.parts[1:]
            for depth in range(1, len(parts) + 1):
                directory = "/" + "/".join(parts[:depth])
                # debugfs 1.47's mkdir of a directory that exists leaves an unconnected inode
                # behind (e2fsck finds it): only missing ones are made.
                if directory not in made and not _exists(image, directory):
                    commands.append(f'mkdir "{directory}"')
                made.add(directory)
            if _exists(image, dest):
                commands.append(f'rm "{dest}"')
            commands.append(f'write "{source}" "{dest}"')
        script = Path(tmp) / "commands"
        script.write_text("\n".join(commands) + "\n")
        run("debugfs", "-w", "-f", script, image)
        for dest, content in files.items():
            got = subprocess.run(["debugfs", "-R", f'cat "{dest}"', str(image)],
                                 capture_output=True, check=False).stdout  # fmt: skip
            want = content.read_bytes() if isinstance(content, Path) else content
            if got != want:
                raise VmError(f"{dest} could not be written into {image}")


def _exists(image: Path, path: str) -> bool:
    """Whether `path` exists in the ext4 file system `image` (debugfs `stat` shows its inode)."""
    shown = subprocess.run(["debugfs", "-R", f'stat "{path}"', str(image)],
                           capture_output=True, text=True, check=False).stdout  # fmt: skip
    return shown.lstrip().startswith("Inode:")
