"""A real Coffer installation in a temporary directory, for integration tests and the demo.

`Cluster` creates a PKI, starts a real `coffer-controller` process (which starts its private
Mosquitto unless told of a broker), real `coffer-agent` processes, and runs the real `coffer`
CLI against them. Every process it starts is stopped by its PID when the cluster closes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from controller.config import DEFAULT_CHUNK_SIZE
from controller.datastore import Datastore, LocalDirectoryStore, MasterKey

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _toml(value: Any) -> str:
    return json.dumps(value)  # TOML strings, numbers and arrays of them read the same as JSON


@dataclass
class Process:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Stop the process (and its own children, e.g. a private broker) and reap it."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        code = self.popen.returncode
        self.popen = None
        return code

    def wait_for_line(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log.read_text(errors="replace").splitlines():
                if text in line:
                    return line
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not print {text!r}:\n{self.log.read_text()[-3000:]}")


@dataclass
class Agent:
    vm_id: str
    config: Path
    process: Process
    restore_dir: Path
    disks: dict[str, Path] = field(default_factory=dict)


class CliError(Exception):
    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(f"coffer exited {result.returncode}: {result.stderr.strip()}")
        self.result = result


class Cluster:
    """A controller, its private broker, and agents, all real processes under `root`."""

    def __init__(
        self,
        root: Path,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        mqtt: str | None = None,
        config: str = "",
        certificate_days: float | None = None,
    ) -> None:
        """`config`: more of controller.toml (e.g. a [datastore] table), written at its end."""
        self.root = root
        self.pki = root / "pki"
        self.port = free_port()
        # The enrolment listener (TLS without client certificates).
        self.enrol_port = free_port()
        # The operator listener: every `coffer` call of the tests goes there, as operators'
        # should (docs/fleet.md).
        self.operator_port = free_port()
        self.chunk_size = chunk_size
        self.mqtt = mqtt
        self.config = config
        self.certificate_days = certificate_days
        self.agents: dict[str, Agent] = {}
        self.controller = Process(
            "controller",
            [str(BIN / "coffer-controller"), "--config", str(root / "controller.toml")],
            root / "controller.log",
        )

    def __enter__(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        self.coffer("pki", "init", "--dir", str(self.pki), json_out=False)
        lines = [
            f"listen = {_toml(f'127.0.0.1:{self.port}')}",
            f"state_dir = {_toml(str(self.root / 'state'))}",
            f"pki_dir = {_toml(str(self.pki))}",
            f"chunk_size = {self.chunk_size}",
            f"enrol_listen = {_toml(f'127.0.0.1:{self.enrol_port}')}",
            f"operator_listen = {_toml(f'127.0.0.1:{self.operator_port}')}",
        ]
        if self.certificate_days is not None:
            lines.append(f"certificate_days = {self.certificate_days}")
        if self.mqtt:
            host, port = self.mqtt.rsplit(":", 1)
            lines += ["[mqtt]", f"host = {_toml(host)}", f"port = {port}"]
        (self.root / "controller.toml").write_text("\n".join(lines) + "\n" + self.config)
        self.start_controller()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for agent in self.agents.values():
            agent.process.stop()
        self.controller.stop()

    def datastore(self, vault: str) -> Path:
        """A vault's datastore directory (the default, local, datastores)."""
        return self.root / "state" / "datastores" / vault

    @property
    def master_key_file(self) -> Path:
        """The master key the controller made on its first start (none configured)."""
        return self.root / "state" / "master.key"

    def open_datastore(self, vault: str) -> Datastore:
        """A vault's (default, local) datastore, opened with the controller's master key."""
        return Datastore.open(
            LocalDirectoryStore(self.datastore(vault)),
            master=MasterKey.from_file(self.master_key_file),
        )

    def start_controller(self, env: dict[str, str] | None = None) -> None:
        """Start the controller (with `env` added to this process's environment)."""
        self.controller.log.write_text("")
        self.controller.start(env={**os.environ, **env} if env else None)
        self.controller.wait_for_line("coffer-controller ready")

    def stop_controller(self) -> None:
        assert self.controller.stop() == 0, self.controller.log.read_text()[-3000:]

    def add_agent(
        self,
        vm_id: str,
        disks: dict[str, Path],
        *,
        service: str = "default",
        region: str = "local",
        name: str | None = None,
        cert_vm: str | None = None,
        start: bool = True,
        issue: bool = True,
    ) -> Agent:
        """An agent for `vm_id`; `cert_vm` issues its certificate for another VM instead, and
        without `issue` it has none (it is to enrol)."""
        tls = self.root / f"tls-{vm_id}"
        if issue:
            self.coffer(
                "pki", "issue-agent", cert_vm or vm_id, "--dir", str(self.pki), "--out",
                str(tls), json_out=False,
            )  # fmt: skip
        restore_dir = self.root / f"restore-{vm_id}"
        restore_dir.mkdir(exist_ok=True)
        config = self.root / f"agent-{vm_id}.toml"
        lines = [
            f"vm_id = {_toml(vm_id)}",
            f"name = {_toml(name or vm_id)}",
            f"service = {_toml(service)}",
            f"region = {_toml(region)}",
            f"controller = {_toml(f'127.0.0.1:{self.port}')}",
            f"tls_dir = {_toml(str(tls))}",
            f"state_dir = {_toml(str(self.root / f'state-{vm_id}'))}",
            f"restore_dirs = {_toml([str(restore_dir)])}",
        ]
        for name, path in disks.items():
            lines += ["[[disks]]", f"name = {_toml(name)}", f"path = {_toml(str(path))}"]
        config.write_text("\n".join(lines) + "\n")
        process = Process(
            f"agent {vm_id}",
            [str(BIN / "coffer-agent"), "--config", str(config)],
            self.root / f"agent-{vm_id}.log",
        )
        agent = Agent(vm_id, config, process, restore_dir, dict(disks))
        self.agents[vm_id] = agent
        if start:
            self.start_agent(vm_id)
        return agent

    def start_agent(self, vm_id: str, timeout: float = 20.0) -> None:
        agent = self.agents[vm_id]
        agent.process.start()
        self.wait_online(vm_id, timeout)

    def wait_online(self, vm_id: str, timeout: float = 20.0, online: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listed = {a["vm_id"]: a for a in self.coffer("agents")}
            if listed.get(vm_id, {}).get("online", False) == online:
                return
            time.sleep(0.1)
        raise TimeoutError(f"agent {vm_id} not {'online' if online else 'offline'}")

    def coffer(self, *args: str, json_out: bool = True, check: bool = True) -> Any:
        """Run the real CLI; its JSON output parsed (or the CompletedProcess)."""
        argv = [str(BIN / "coffer")]
        if args[:2] not in (("pki", "init"), ("pki", "issue-agent"), ("pki", "issue-operator")):
            argv += ["--controller", f"127.0.0.1:{self.operator_port}", "--tls-dir", str(self.pki)]
        argv += list(args) + (["--json"] if json_out else [])
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if check and result.returncode != 0:
            raise CliError(result)
        if not json_out:
            return result
        return json.loads(result.stdout) if result.stdout.strip() else None

    def protect(self, vm_id: str, vault: str = "", policy: str = "DefaultPolicy") -> None:
        """Walk `vm_id` through the vault flow: the vault (by default one named for the VM's
        region, created if need be), register, protect."""
        agent = {a["vm_id"]: a for a in self.coffer("agents")}[vm_id]
        vault = vault or agent["region"]
        if vault not in {v["name"] for v in self.coffer("vault", "list")}:
            self.coffer("vault", "create", vault, "--region", agent["region"])
        items = {i["vm_id"]: i for i in self.coffer("items", "--vault", vault)}
        if vm_id not in items:
            self.coffer("register", "--vault", vault, vm_id)
            items[vm_id] = {"state": "Registered"}
        if items[vm_id]["state"] == "Registered":
            self.coffer("protect", "--vault", vault, "--policy", policy, vm_id)

    def backup(self, vm_id: str, check: bool = True) -> dict[str, Any]:
        """Back `vm_id` up now, protecting it first (in its region's vault) if it is not yet."""
        protected = {
            i["vm_id"]
            for v in self.coffer("vault", "list")
            for i in self.coffer("items", "--vault", v["name"])
            if i["state"] not in ("Registered", "Registering", "ProtectionStopped")
        }
        if vm_id not in protected:
            self.protect(vm_id)
        job: dict[str, Any] = self.coffer("backup-now", vm_id, check=check)
        return job

    def restore(self, vm_id: str, rp: str, disk: str, target: Path) -> dict[str, Any]:
        job: dict[str, Any] = self.coffer(
            "restore", vm_id, "--rp", rp, "--disk", disk, "--target", str(target)
        )
        return job
