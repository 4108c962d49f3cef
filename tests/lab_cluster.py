"""A Coffer installation on the lab: a real controller on the bridge, a real agent in each VM.

`LabCluster` brings up a lab (`deploy.lab.Lab`) with a name and subnet of its own, creates a
PKI whose controller certificate is valid for the bridge address, starts a real
`coffer-controller` listening there (its private Mosquitto listens on the same address), and
starts one real `coffer-agent` inside each VM (`Lab.spawn`, tagged `agent`) that dials the
controller over the bridge. The operator's side is the real `coffer` CLI, run on the host.

Each agent's disk is its VM's ext4 image on the lab's scratch XFS; its TLS files, state and
restore directory are under `root`, on the host's file system, which the VMs share (they are
namespaces, not chroots), so restored images can be checked from the host.

Closing (also after a failed start) stops the agents, the controller and takes the lab down;
every step is tried even when an earlier one fails.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from deploy.lab import Lab
from deploy.lab.lab import LabError, link_exists
from tests.cluster import BIN, CliError, Process

REPO = Path(__file__).resolve().parent.parent
REGION = "lab"
CLOSE_ERRORS = (LabError, OSError, RuntimeError, subprocess.SubprocessError)
VAULT = "lab-vault"


def _toml(value: Any) -> str:
    return json.dumps(value)  # TOML strings, numbers, booleans and arrays read the same as JSON


def _taken_networks() -> list[ipaddress.IPv4Network]:
    shown = subprocess.run(["ip", "-json", "addr"], capture_output=True, text=True, check=True)
    return [
        ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}").network
        for link in json.loads(shown.stdout)
        for a in link.get("addr_info", [])
        if a.get("family") == "inet"
    ]


def unique_lab_name_and_subnet() -> tuple[str, str]:
    """A lab name and a /24 no interface of this machine uses, derived from our PID."""
    taken = _taken_networks()
    pid = os.getpid()
    for step in range(250):
        name = f"e{(pid + step) % 100000}"
        subnet = ipaddress.IPv4Network(f"10.79.{(pid + step) % 250}.0/24")
        if not link_exists(f"{name}-lab0") and not any(subnet.overlaps(n) for n in taken):
            return name, str(subnet)
    raise RuntimeError("no free lab name and subnet")


@dataclass
class LabAgent:
    """One VM's agent: its files on the host, its disk, and how its backups are made."""

    vm: str
    config: Path
    log: Path
    tls: Path
    state: Path
    restore_dir: Path
    image: Path  # the VM's disk image (on the scratch XFS)
    mountpoint: Path  # where the disk is mounted inside the VM
    consistency: Mapping[str, Any]
    snapshot: Sequence[str] | None = None  # the disk's own snapshot providers


class LabCluster:
    """The lab's VMs, each with an agent, and a controller on the bridge address."""

    def __init__(self, root: Path, vms: Sequence[str], *, disk_mib: int = 256,
                 scratch_mib: int = 1536, regions: Mapping[str, str] | None = None,
                 services: Mapping[str, str] | None = None, config: str = "",
                 enrol: bool = False) -> None:  # fmt: skip
        """`config`: more of controller.toml (e.g. a [web] table), written at its end.
        `enrol`: an enrolment listener on the bridge too (`enrol_port`), for VMs that enrol."""
        self.root = root
        self.enrol = enrol
        self.enrol_port = 0
        self.config = config
        self.vms = list(vms)
        # Each VM's region and service as its agent reports them (default: the lab's, "lab").
        self.regions = dict(regions or {})
        self.services = dict(services or {})
        name, subnet = unique_lab_name_and_subnet()
        self.lab = Lab(root / "lab", name=name, subnet=subnet, disk_mib=disk_mib,
                       scratch_mib=scratch_mib)  # fmt: skip
        self.pki = root / "pki"
        self.port = 0
        self.agents: dict[str, LabAgent] = {}
        self.controller = Process(
            "controller",
            [str(BIN / "coffer-controller"), "--config", str(root / "controller.toml")],
            root / "controller.log",
        )

    @property
    def host(self) -> str:
        return self.lab.bridge_address

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- up and down ----------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self._up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _up(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.lab.up(self.vms)
        self.port = self._free_port()
        self.coffer("pki", "init", "--dir", str(self.pki), "--host", self.host, json_out=False)
        lines = [
            f"listen = {_toml(self.address)}",
            f"state_dir = {_toml(str(self.root / 'state'))}",
            f"pki_dir = {_toml(str(self.pki))}",
        ]
        if self.enrol:
            self.enrol_port = self._free_port()
            lines.append(f"enrol_listen = {_toml(f'{self.host}:{self.enrol_port}')}")
        (self.root / "controller.toml").write_text("\n".join(lines) + "\n" + self.config)
        self.controller.start()
        self.controller.wait_for_line("coffer-controller ready")
        for vm in self.vms:
            self._add_agent(vm)
        for vm in self.vms:
            self.wait_online(vm)

    def _free_port(self) -> int:
        with socket.socket() as s:  # a port free on the bridge address
            s.bind((self.host, 0))
            return int(s.getsockname()[1])

    def close(self) -> None:
        """Stop every agent and the controller, take the lab down; each step is tried."""
        errors: list[BaseException] = []
        for vm in list(self.agents):
            try:
                self.stop_agent(vm)
            except CLOSE_ERRORS as exc:  # the lab's down ends the VM, and the agent with it
                errors.append(exc)
        try:
            self.controller.stop()
        except CLOSE_ERRORS as exc:
            errors.append(exc)
        try:
            self.lab.down()
        except CLOSE_ERRORS as exc:
            errors.append(exc)
        if errors:
            raise errors[0]

    # -- agents ---------------------------------------------------------------------------

    def _add_agent(self, vm: str) -> None:
        tls = self.root / f"tls-{vm}"
        self.coffer("pki", "issue-agent", vm, "--dir", str(self.pki), "--out", str(tls),
                    json_out=False)  # fmt: skip
        restore_dir = self.root / f"restore-{vm}"
        restore_dir.mkdir(exist_ok=True)
        state = self.lab.vm(vm)
        self.agents[vm] = LabAgent(
            vm=vm,
            config=self.root / f"agent-{vm}.toml",
            log=self.root / f"agent-{vm}.log",
            tls=tls,
            state=self.root / f"state-{vm}",
            restore_dir=restore_dir,
            image=Path(state.image),
            mountpoint=Path(state.mountpoint),
            consistency={"thaw_deadline": 20, "freeze_timeout": 5},
        )
        self.start_agent(vm, wait=False)

    def _write_config(self, agent: LabAgent) -> None:
        lines = [
            f"vm_id = {_toml(agent.vm)}",
            f"name = {_toml(agent.vm)}",
            f"service = {_toml(self.services.get(agent.vm, 'lab'))}",
            f"region = {_toml(self.regions.get(agent.vm, REGION))}",
            f"controller = {_toml(self.address)}",
            f"tls_dir = {_toml(str(agent.tls))}",
            f"state_dir = {_toml(str(agent.state))}",
            f"restore_dirs = {_toml([str(agent.restore_dir)])}",
            "[[disks]]",
            f"name = {_toml('root')}",
            f"path = {_toml(str(agent.image))}",
        ]
        if agent.snapshot is not None:
            lines.append(f"snapshot = {_toml(list(agent.snapshot))}")
        lines.append("[consistency]")
        tables = []
        for key, value in agent.consistency.items():
            if isinstance(value, Mapping):
                tables.append(f"[consistency.{key}]")
                tables += [f"{k} = {_toml(v)}" for k, v in value.items()]
            else:
                lines.append(f"{key} = {_toml(value)}")
        agent.config.write_text("\n".join(lines + tables) + "\n")

    def configure(
        self,
        vm: str,
        *,
        consistency: Mapping[str, Any] | None = None,
        snapshot: Sequence[str] | None = None,
    ) -> None:
        """Restart `vm`'s agent with this `[consistency]` table and disk providers."""
        agent = self.agents[vm]
        if consistency is not None:
            agent.consistency = consistency
        agent.snapshot = snapshot
        self.stop_agent(vm)
        self.start_agent(vm)

    def start_agent(self, vm: str, *, wait: bool = True, timeout: float = 30) -> int:
        """Start `vm`'s agent inside the VM (its host PID); wait until it is online."""
        agent = self.agents[vm]
        self._write_config(agent)
        sessions = self.sessions(vm)
        pid = self.lab.spawn(
            vm,
            [str(BIN / "coffer-agent"), "--config", str(agent.config)],
            tag="agent",
            log=agent.log,
            cwd=str(REPO),
        )
        if wait:
            # This agent's own session, not a stale one the controller may still list.
            deadline = time.monotonic() + timeout
            while self.sessions(vm) <= sessions:
                if time.monotonic() > deadline or not self.agent_alive(vm):
                    raise TimeoutError(f"the agent of {vm} did not connect:\n"
                                       + agent.log.read_text()[-3000:])  # fmt: skip
                time.sleep(0.05)
            self.wait_online(vm, timeout=timeout)
        return pid

    def sessions(self, vm: str) -> int:
        """How many sessions `vm`'s agent log says the controller has accepted."""
        agent = self.agents[vm]
        if not agent.log.exists():
            return 0
        return agent.log.read_text(errors="replace").count("connected to controller")

    def agent_alive(self, vm: str) -> bool:
        proc = self.lab.vm(vm).processes.get("agent")
        return proc is not None and proc.alive()

    def stop_agent(self, vm: str, signum: int = signal.SIGTERM, timeout: float = 15) -> None:
        """Stop `vm`'s agent (SIGKILL if it does not end in time) and wait until it is gone."""
        proc = self.lab.vm(vm).processes.get("agent")
        if proc is None or not proc.alive():
            return
        proc.signal(signum)
        if not proc.wait_gone(timeout):
            proc.signal(signal.SIGKILL)
            if not proc.wait_gone(timeout):
                raise RuntimeError(f"the agent of {vm} (pid {proc.pid}) does not end")

    def kill_agent(self, vm: str) -> int:
        """SIGKILL `vm`'s agent, as `python -m deploy.lab kill-agent` does; its PID."""
        pid = self.lab.kill(vm, "agent", signal.SIGKILL)
        self.lab.vm(vm).processes["agent"].wait_gone(10)
        return pid

    def wait_online(self, vm: str, *, online: bool = True, timeout: float = 30) -> float:
        """Wait until `coffer agents` shows `vm` online (or offline); the seconds it took."""
        started = time.monotonic()
        while True:
            listed = {a["vm_id"]: a for a in self.coffer("agents")}
            if listed.get(vm, {}).get("online", False) == online:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                log = self.agents[vm].log
                raise TimeoutError(
                    f"agent {vm} not {'online' if online else 'offline'} after {timeout} s:\n"
                    + (log.read_text()[-3000:] if log.exists() else "")
                )
            time.sleep(0.2)

    # -- inside a VM ----------------------------------------------------------------------

    def run(self, vm: str, argv: Sequence[str], *, timeout: float = 60) -> str:
        """Run a command inside `vm` (from the repository, as the agent runs); its stdout."""
        done = self.lab.run(vm, argv, timeout=timeout, cwd=str(REPO))
        if done.returncode != 0:
            raise RuntimeError(f"{vm}: {' '.join(argv)}: exit {done.returncode}: {done.stderr}")
        return done.stdout

    def spawn(self, vm: str, argv: Sequence[str], *, tag: str, log: Path | None = None) -> int:
        return self.lab.spawn(vm, argv, tag=tag, log=log, cwd=str(REPO))

    def python(self, vm: str, code: str, *args: str, tag: str, log: Path | None = None) -> int:
        """Start `python -c code args…` inside `vm` in the background; its host PID."""
        return self.spawn(vm, [sys.executable, "-c", code, *args], tag=tag, log=log)

    def kill(self, vm: str, tag: str) -> None:
        proc = self.lab.vm(vm).processes.get(tag)
        if proc is not None and proc.alive():
            proc.signal(signal.SIGKILL)
            proc.wait_gone(10)

    # -- the operator's CLI ---------------------------------------------------------------

    def coffer(self, *args: str, json_out: bool = True, check: bool = True) -> Any:
        """Run the real CLI against the controller on the bridge; its JSON output parsed."""
        argv = [str(BIN / "coffer")]
        if args[0] != "pki":
            argv += ["--controller", self.address, "--tls-dir", str(self.pki)]
        argv += list(args) + (["--json"] if json_out else [])
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if check and result.returncode != 0:
            raise CliError(result)
        if not json_out:
            return result
        return json.loads(result.stdout) if result.stdout.strip() else None

    def protect(self, *vms: str) -> None:
        """Register and protect `vms` in the lab's vault (created if need be) if not yet."""
        if VAULT not in {v["name"] for v in self.coffer("vault", "list")}:
            self.coffer("vault", "create", VAULT, "--region", REGION)
        items = {i["vm_id"]: i for i in self.coffer("items", "--vault", VAULT)}
        new = [vm for vm in vms if vm not in items]
        if new:
            self.coffer("register", "--vault", VAULT, *new)
        unprotected = [vm for vm in vms if items.get(vm, {"state": "Registered"})["state"]
                       == "Registered"]  # fmt: skip
        if unprotected:
            self.coffer("protect", "--vault", VAULT, "--policy", "DefaultPolicy", *unprotected)

    def backup(self, *vms: str) -> list[dict[str, Any]]:
        """Back `vms` up at once and wait for the jobs; the jobs, in the order of `vms`."""
        result = self.coffer("backup-now", *vms, check=False)
        jobs = result if isinstance(result, list) else [result]
        by_vm = {job["vm_id"]: job for job in jobs}
        return [by_vm[vm] for vm in vms]

    def start_backup(self, vm: str) -> str:
        """Start a backup of `vm` and return its job id at once."""
        (job,) = self.coffer("backup-now", vm, "--no-wait")
        return str(job["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self.coffer("job", "show", job_id)
        return job

    def wait_job(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        """The job once it has ended."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] not in ("InProgress", "Cancelling"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(0.2)

    def recovery_points(self, vm: str) -> list[dict[str, Any]]:
        points: list[dict[str, Any]] = self.coffer("rp", "list", vm)
        return points

    def manifests(self) -> list[Path]:
        """The recovery point manifests in the lab vault's datastore."""
        return sorted((self.root / "state" / "datastores" / VAULT / "manifests").glob("*"))

    def restore(self, vm: str, rp: str, target: Path, disk: str = "root") -> dict[str, Any]:
        job: dict[str, Any] = self.coffer(
            "restore", vm, "--rp", rp, "--disk", disk, "--target", str(target), check=False
        )
        return job

    def logs(self) -> str:
        """The tails of the controller's and agents' logs, for a failing assertion."""
        parts = []
        for name, log in [("controller", self.controller.log)] + [
            (f"agent {a.vm}", a.log) for a in self.agents.values()
        ]:
            with contextlib.suppress(OSError):
                parts.append(f"--- {name}\n{log.read_text(errors='replace')[-2500:]}")
        return "\n".join(parts)
