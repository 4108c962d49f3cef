"""The lab: VMs of namespaces with their own hostname, address, PID space and mounted disk."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.lab import Lab

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

# Names and subnet of this run's own: a lab someone else has up is never touched.
NAME = f"t{os.getpid() % 100000}"
SUBNET = f"10.78.{os.getpid() % 250}.0/24"


def new_lab(directory: Path) -> Lab:
    return Lab(directory, name=NAME, subnet=SUBNET, disk_mib=64, scratch_mib=320)


def leftovers(directory: Path, pids: list[int], name: str = NAME) -> list[str]:
    """Whatever of a lab is still on the machine."""
    found = []
    links = json.loads(subprocess.run(["ip", "-json", "link"], capture_output=True,
                                      text=True, check=True).stdout)  # fmt: skip
    found += [f"link {link['ifname']}" for link in links if link["ifname"].startswith(f"{name}-")]
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        if backing.read_text().startswith(str(directory)):
            found.append(f"loop {backing.parent.parent.name}")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if line.split()[4].startswith(str(directory)):
            found.append(f"mount {line.split()[4]}")
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().split(") ")[1][0] != "Z":
            found.append(f"process {pid}")
    if directory.exists():
        found += [f"file {p}" for p in directory.rglob("*")]
    return found


def vm_pids(lab: Lab) -> list[int]:
    pids = []
    for vm in lab.state.vms.values():
        for proc in (vm.init, vm.unshare, *vm.processes.values()):
            if proc is not None:
                pids.append(proc.pid)
    return pids


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    directory = tmp_path_factory.mktemp("lab") / "lab"
    built = new_lab(directory)
    try:
        built.up(["vm1", "vm2"])
        yield built
    finally:
        pids = vm_pids(built)
        # As after a crash: another process, knowing only the directory, takes it down.
        Lab(directory).down()
        for popen in built._popens:
            popen.wait(10)
        assert leftovers(directory, pids) == []


def connect(
    lab: Lab, vm: str, host: str, port: int, timeout: float = 2
) -> subprocess.CompletedProcess[str]:
    """From inside the VM: connect, print what the peer sends."""
    code = (
        "import socket, sys\n"
        f"s = socket.create_connection(({host!r}, {port}), timeout={timeout})\n"
        "print(s.recv(100).decode())\n"
    )
    return lab.run(vm, [sys.executable, "-c", code], timeout=timeout + 10)


def test_each_vm_has_its_own_hostname_and_pid_space(lab: Lab) -> None:
    for vm in ("vm1", "vm2"):
        assert lab.run(vm, ["hostname"]).stdout.strip() == vm
        pids = [p for p in lab.run(vm, ["ls", "/proc"]).stdout.split() if p.isdigit()]
        assert "1" in pids
        assert len(pids) < 10  # its init, the command, little else
    assert socket.gethostname() not in ("vm1", "vm2")


def test_a_vm_reaches_the_bridge_address(lab: Lab) -> None:
    with socket.socket() as server:
        server.bind((lab.bridge_address, 0))
        server.listen()
        server.settimeout(10)
        port = server.getsockname()[1]
        proc = lab.spawn("vm1", [sys.executable, "-c", (
            "import socket\n"
            f"socket.create_connection(({lab.bridge_address!r}, {port}), timeout=5).recv(1)\n"
        )])  # fmt: skip
        conn, (peer, _) = server.accept()
        conn.close()
        assert peer == lab.vm("vm1").address
        assert proc > 0


def test_vms_reach_each_other_over_the_bridge(lab: Lab) -> None:
    serve = (
        "import socket\n"
        "s = socket.socket(); s.bind(('0.0.0.0', 7070)); s.listen()\n"
        "c, _ = s.accept(); c.sendall(socket.gethostname().encode()); c.close()\n"
    )
    lab.spawn("vm2", [sys.executable, "-c", serve], tag="server")
    vm2 = lab.vm("vm2").address
    for _ in range(50):  # until the server listens
        done = connect(lab, "vm1", vm2, 7070)
        if done.returncode == 0:
            break
        time.sleep(0.1)
    assert done.stdout.strip() == "vm2", done.stderr
    # The server's port is in vm2's network namespace only.
    assert connect(lab, "vm1", "127.0.0.1", 7070).returncode != 0


def test_a_vm_disk_is_mounted_in_the_vm_only(lab: Lab) -> None:
    mountpoint = lab.vm("vm1").mountpoint
    inside = lab.run("vm1", ["findmnt", "--noheadings", "--output", "FSTYPE", mountpoint])
    assert inside.stdout.strip() == "ext4"
    assert lab.run("vm1", ["sh", "-c", f"echo hello > {mountpoint}/greeting"]).returncode == 0
    root_mounts = [
        line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
    ]
    assert mountpoint not in root_mounts
    assert list(Path(mountpoint).iterdir()) == []  # an empty directory out here
    # vm2 has a disk of its own.
    assert lab.run("vm2", ["cat", f"{mountpoint}/greeting"]).returncode != 0
    assert lab.run("vm1", ["cat", f"{mountpoint}/greeting"]).stdout == "hello\n"


def test_cut_and_restore_a_vm(lab: Lab) -> None:
    with socket.socket() as server:
        server.bind((lab.bridge_address, 0))
        server.listen(8)
        port = server.getsockname()[1]
        lab.cut("vm1")
        try:
            assert lab.status()["vms"]["vm1"]["link"] == "down"
            assert connect(lab, "vm1", lab.bridge_address, port, timeout=1).returncode != 0
        finally:
            lab.restore("vm1")
        assert lab.status()["vms"]["vm1"]["link"] == "up"
        for _ in range(50):  # the link comes back up
            lab.spawn("vm1", [sys.executable, "-c", (
                "import socket\n"
                f"socket.create_connection(({lab.bridge_address!r}, {port}), timeout=1)\n"
            )])  # fmt: skip
            server.settimeout(0.5)
            try:
                server.accept()[0].close()
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError("vm1 is still cut off after restore")


def test_kill_a_tagged_process(lab: Lab) -> None:
    pid = lab.spawn("vm2", ["sleep", "300"], tag="agent")
    assert lab.status()["vms"]["vm2"]["processes"]["agent"] == {"pid": pid, "alive": True}
    assert lab.kill("vm2", "agent") == pid
    lab.vm("vm2").processes["agent"].wait_gone(10)
    assert lab.status()["vms"]["vm2"]["processes"]["agent"]["alive"] is False


def test_a_consistent_snapshot_inside_a_vm(lab: Lab) -> None:
    """The agent's view from inside a VM: its disk's file system is found, frozen, cloned."""
    vm = lab.vm("vm1")
    code = (
        "import asyncio, json\n"
        "from pathlib import Path\n"
        "from agent.consistency import ConsistencyPolicy, consistent_snapshot\n"
        "async def main():\n"
        f"    async with consistent_snapshot([('root', Path({vm.image!r}))], "
        "ConsistencyPolicy()) as s:\n"
        "        d = s.disks['root']\n"
        "        print(json.dumps({'provider': d.provider, 'consistency': d.consistency,\n"
        "              'mounts': [str(m.mountpoint) for m in d.mounts]}))\n"
        "    print(json.dumps({'frozen_ms': s.frozen_ms}))\n"
        "asyncio.run(main())\n"
    )
    done = lab.run("vm1", [sys.executable, "-c", code], cwd=str(Path(__file__).parent.parent))
    assert done.returncode == 0, done.stderr
    first, second = (json.loads(line) for line in done.stdout.splitlines())
    assert first == {"provider": "reflink", "consistency": "file-system", "mounts": [vm.mountpoint]}
    assert 0 < second["frozen_ms"] < 1000
    print(f"frozen inside the VM: {second['frozen_ms']:.1f} ms")


def test_up_and_down_are_idempotent(tmp_path: Path) -> None:
    directory = tmp_path / "lab"
    name = f"u{os.getpid() % 100000}"
    subnet = f"10.78.{(os.getpid() + 1) % 250}.0/24"
    lab = Lab(directory, name=name, subnet=subnet, disk_mib=64, scratch_mib=320)
    try:
        lab.up(["a1"])
        first = lab.status()
        lab.up(["a1"])
        assert lab.status()["vms"]["a1"]["init_pid"] == first["vms"]["a1"]["init_pid"]
        assert lab.run("a1", ["hostname"]).stdout.strip() == "a1"
    finally:
        pids = vm_pids(lab)
        lab.down()
        lab.down()
    assert leftovers(directory, pids, name) == []
    Lab(directory).down()  # no state at all: nothing to do
