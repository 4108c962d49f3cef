"""Coffer under benchmark: a private controller and one agent whose one disk is the image file.

`setup` makes a PKI (`coffer pki init`, `coffer pki issue-agent`), writes `controller.toml`
(a free loopback port, the chunk size under test, no `[mqtt]` section so the controller starts
its own Mosquitto) and `agent.toml` (vm_id ``bench-vm``, one disk ``root`` = the image path),
starts `coffer-controller` and `coffer-agent`, and waits until `coffer agents --json` lists the
VM. Each step is one operator CLI call that waits for its job:
`coffer backup-now bench-vm --json`, `coffer restore bench-vm --rp RP --disk root --target
... --json`, or (`rollback`) `coffer restore bench-vm --rp RP --disk root --in-place --yes
--json`, which rolls the agent's disk itself back to an earlier recovery point.

A step's figures: wall time of the CLI call; CPU seconds of controller + agent (from
/proc/PID/stat deltas) + the CLI itself; peak RSS of controller and of agent separately
(`clear_refs` then `VmHWM`); bytes under `state_dir/datastores` (the whole `state_dir` if that
does not exist), so "added" is what the datastore grew by.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.datastore import CONFIG_KEY, DatastoreConfig
from tests.bench.measure import (
    ProcessWatch,
    StepFailed,
    StepResult,
    allocated_bytes,
    proc_rss_bytes,
    run_child,
)
from tests.bench.single_file import SmallFile, read_bytes, result, wait_for_file

VM_ID = "bench-vm"
VAULT = "bench"
DISK = "root"
_OK = ("Completed", "CompletedWithWarnings")
_JOB_FIELDS = (
    "id", "status", "bytes_read", "bytes_sent", "bytes_stored", "recovery_point_id", "restore"
)  # fmt: skip


def _nothing() -> None:
    return None


def executable(name: str) -> list[str]:
    """argv prefix running console script `name` as one process (no pyenv shim between)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return [str(beside)]
    module, func = {
        "coffer": ("controller.cli.main", "main"),
        "coffer-controller": ("controller.main", "main"),
        "coffer-agent": ("agent.main", "main"),
    }[name]
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def size_label(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


class Coffer:
    """One Coffer install (controller + agent) with a datastore of one chunk size."""

    def __init__(
        self,
        workdir: Path,
        source: Path,
        *,
        chunk_size: int = 512 << 10,
        before_step: Callable[[], None] = _nothing,
        timeout_s: float = 3600.0,
        start_timeout_s: float = 60.0,
        plain_vault: bool = False,
    ) -> None:
        self.name = f"coffer-{size_label(chunk_size)}"
        # The vault made format 1 (plain, as before encryption at rest), for the upgrade's
        # benchmark (tests.bench.upgrade).
        self.plain_vault = plain_vault
        self.dir = workdir
        self.source = source
        self.chunk_size = chunk_size
        self.before_step = before_step
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.pki = workdir / "pki"
        self.agent_tls = workdir / "agent-tls"
        self.state = workdir / "state"
        self.agent_state = workdir / "agent-state"
        self.restore_dir = workdir / "restore"
        self.logs = workdir / "logs"
        self.port = 0
        self.controller: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.last_job: dict[str, Any] = {}
        self.recovery_points: dict[str, str] = {}  # by the backup step that made it

    # -- the Tool protocol -------------------------------------------------------------------

    def version(self) -> str:
        done = subprocess.run(
            [*executable("coffer"), "--version"], capture_output=True, text=True, check=False
        )
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"coffer {version('coffer')}"
        except PackageNotFoundError:
            return "coffer (version unknown)"

    def settings(self) -> str:
        return (
            f"chunk_size {size_label(self.chunk_size)} (fixed, disk-aligned), zstd at rest, "
            "encrypted at rest (the default: AES-256-GCM, keyed chunk names), mTLS on the wire"
        )

    def setup(self) -> None:
        for d in (self.state, self.agent_state, self.restore_dir, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._cli_plain(["pki", "init", "--dir", str(self.pki), "--host", "127.0.0.1"])
        self._cli_plain(
            ["pki", "issue-agent", VM_ID, "--dir", str(self.pki), "--out", str(self.agent_tls)]
        )
        controller_toml = self.dir / "controller.toml"
        controller_toml.write_text(
            f'listen = "127.0.0.1:{self.port}"\n'
            f'state_dir = "{self.state}"\n'
            f'pki_dir = "{self.pki}"\n'
            f"chunk_size = {self.chunk_size}\n"
        )
        agent_toml = self.dir / "agent.toml"
        agent_toml.write_text(
            f'vm_id = "{VM_ID}"\n'
            f'name = "{VM_ID}"\n'
            'service = "bench"\n'
            'region = "local"\n'
            f'controller = "127.0.0.1:{self.port}"\n'
            f'tls_dir = "{self.agent_tls}"\n'
            f'state_dir = "{self.agent_state}"\n'
            f'restore_dirs = ["{self.restore_dir}"]\n'
            "\n[[disks]]\n"
            f'name = "{DISK}"\n'
            f'path = "{self.source}"\n'
        )
        self.controller = self._start("coffer-controller", controller_toml)
        self._wait_listening()
        self.agent = self._start("coffer-agent", agent_toml)
        self._wait_agent()
        # The vault workflow: a vault in the agent's region, the VM registered and protected.
        if self.plain_vault:
            # A datastore.json found where the vault's datastore goes is used as it is.
            self.vault_datastore.mkdir(parents=True, exist_ok=True)
            (self.vault_datastore / CONFIG_KEY).write_bytes(
                DatastoreConfig.plain(self.chunk_size).encode()
            )
        self._cli_plain(["vault", "create", VAULT, "--region", "local"])
        self._cli_plain(["register", "--vault", VAULT, VM_ID])
        self._cli_plain(["protect", "--vault", VAULT, "--policy", "DefaultPolicy", VM_ID])

    def backup(self, step: str) -> StepResult:
        job, result = self._measured(step, ["backup-now", VM_ID, "--json"])
        self.last_job = job
        if job.get("recovery_point_id"):
            self.recovery_points[step] = str(job["recovery_point_id"])
        return result

    def restore(self, step: str, rp: str = "") -> tuple[StepResult, Path]:
        """A restore of `rp` (default: the latest) to a new image; the image."""
        rp = rp or self._latest_rp()
        target = self.restore_dir / f"{step}.img"
        target.unlink(missing_ok=True)
        argv = ["restore", VM_ID, "--rp", rp, "--disk", DISK, "--target", str(target), "--json"]
        _, result = self._measured(step, argv)
        result.detail["recovery_point_id"] = rp
        return result, target

    def rollback(self, step: str, rp: str) -> StepResult:
        """Roll the agent's disk (the source image itself) back to `rp` in place."""
        argv = ["restore", VM_ID, "--rp", rp, "--disk", DISK, "--in-place", "--yes", "--json"]
        _, result = self._measured(step, argv)
        result.detail["recovery_point_id"] = rp
        return result

    def get_file(self, step: str, file: SmallFile) -> StepResult:
        """`coffer files get` of one file of the latest recovery point (tests.bench.single_file)."""
        self._alive()
        assert self.controller is not None
        rp = self._latest_rp()
        destination = self.restore_dir / step
        shutil.rmtree(destination, ignore_errors=True)
        target = destination / Path(file.path).name
        argv = ["files", "get", VM_ID, "--rp", rp, "--disk", DISK, file.path,
                "--to", str(destination), "--json"]  # fmt: skip
        out = self.logs / f"{step}.json"
        self.before_step()
        io_before = read_bytes(self.controller.pid)
        with out.open("wb") as stdout, (self.logs / "cli.txt").open("ab") as stderr:
            start = time.perf_counter()
            proc = subprocess.Popen(self._cli(argv), stdout=stdout, stderr=stderr)
            try:
                first = wait_for_file(target, lambda: proc.poll() is not None, self.timeout_s)
            finally:
                proc.wait(self.timeout_s)
            total = time.perf_counter() - start
        fetched = read_bytes(self.controller.pid) - io_before
        job: dict[str, Any] = json.loads(out.read_text() or "{}")
        if proc.returncode != 0 or job.get("status") not in _OK:
            raise StepFailed(
                f"coffer files get: exit {proc.returncode}: {job.get('error_code', '')} "
                f"{job.get('error_message', '')}"
            )
        details = job.get("details", {})
        return result(
            self.name,
            self.source.stat().st_size,
            first - start,
            total,
            fetched,
            file,
            target,
            coffer_bytes_fetched=int(job.get("bytes_read", 0)),
            coffer_raw_bytes_fetched=int(details.get("raw_bytes_fetched", 0)),
            coffer_chunks_fetched=int(details.get("chunks_fetched", 0)),
            recovery_point_id=rp,
        )

    def close(self) -> None:
        # The agent first, so the controller does not see a session die under a job.
        for attr in ("agent", "controller"):
            proc = getattr(self, attr)
            if proc is not None:
                _stop(proc)
                setattr(self, attr, None)

    # -- helpers -----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def vault_datastore(self) -> Path:
        """The bench vault's datastore directory."""
        return self.state / "datastores" / VAULT

    @property
    def datastore(self) -> Path:
        stores = self.state / "datastores"
        return stores if stores.exists() else self.state

    def _cli(self, args: list[str]) -> list[str]:
        if args[0] == "pki":
            return [*executable("coffer"), *args]
        return [
            *executable("coffer"),
            "--controller",
            self.address,
            "--tls-dir",
            str(self.pki),
            *args,
        ]

    def _cli_plain(self, args: list[str]) -> str:
        out = self.logs / "cli-out.txt"
        run = run_child(self._cli(args), self.logs / "cli.txt", stdout=out, timeout_s=120)
        if run.returncode != 0:
            raise StepFailed(f"coffer {' '.join(args)}: exit {run.returncode}\n{run.tail()}")
        return out.read_text()

    def _start(self, name: str, config: Path) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.txt").open("ab")
        try:
            # Its own session, so close() can also end a Mosquitto child left behind.
            return subprocess.Popen(
                [*executable(name), "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()

    def _alive(self) -> None:
        for name, proc in (("controller", self.controller), ("agent", self.agent)):
            if proc is not None and proc.poll() is not None:
                log = self.logs / f"coffer-{name}.txt"
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                raise StepFailed(f"coffer-{name} exited with {proc.returncode}\n{tail}")

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            self._alive()
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise StepFailed(f"coffer-controller not listening on {self.address}")

    def _wait_agent(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        last = ""
        while time.monotonic() < deadline:
            self._alive()
            out = self.logs / "agents.json"
            run = run_child(self._cli(["agents", "--json"]), self.logs / "cli.txt", stdout=out)
            if run.returncode == 0:
                last = out.read_text()
                try:
                    listing = json.loads(last or "null")
                except json.JSONDecodeError:
                    listing = None
                if _agent_online(listing, VM_ID):
                    return
            time.sleep(0.5)
        raise StepFailed(f"agent {VM_ID} never showed up in `coffer agents`: {last[-500:]}")

    def _latest_rp(self) -> str:
        rp = self.last_job.get("recovery_point_id")
        if rp:
            return str(rp)
        listing = json.loads(self._cli_plain(["rp", "list", VM_ID, "--json"]))
        items = listing.get("recovery_points", []) if isinstance(listing, dict) else listing
        if not items:
            raise StepFailed(f"no recovery point of {VM_ID} to restore")
        newest = max(items, key=lambda rp: str(rp.get("created_at") or rp.get("time") or ""))
        return str(newest.get("id") or newest.get("recovery_point_id"))

    def _measured(self, step: str, args: list[str]) -> tuple[dict[str, Any], StepResult]:
        self._alive()
        if self.controller is None or self.agent is None:
            raise StepFailed(f"{self.name} is not set up")
        pids = {"controller": self.controller.pid, "agent": self.agent.pid}
        before = allocated_bytes(self.datastore)
        image_bytes = self.source.stat().st_size
        agent_rss_before = proc_rss_bytes(self.agent.pid)
        self.before_step()
        out = self.logs / f"{step}.json"
        with ProcessWatch(pids) as watch:
            run = run_child(
                self._cli(args), self.logs / "cli.txt", stdout=out, timeout_s=self.timeout_s
            )
        after = allocated_bytes(self.datastore)
        text = out.read_text()
        try:
            job: dict[str, Any] = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            job = {"unparsed": text[-2000:]}
        status = str(job.get("status", ""))
        if run.returncode != 0 or status not in _OK:
            self._alive()
            raise StepFailed(
                f"coffer {' '.join(args)}: exit {run.returncode}, status {status or '?'}: "
                f"{job.get('error_code', '')} {job.get('error_message', '')}\n{run.tail()}"
            )
        detail = {
            "cpu_s_controller": watch.cpu_s["controller"],
            "cpu_s_agent": watch.cpu_s["agent"],
            "cpu_s_cli": run.cpu_s,
            "peak_rss_controller": watch.peak_rss["controller"],
            "peak_rss_agent": watch.peak_rss["agent"],
            "rss_agent_before": agent_rss_before,
            "job": {k: job.get(k) for k in _JOB_FIELDS},
        }
        result = StepResult(
            tool=self.name,
            step=step,
            image_bytes=image_bytes,
            wall_s=run.wall_s,
            cpu_s=sum(watch.cpu_s.values()) + run.cpu_s,
            peak_rss=max(watch.peak_rss.values()),
            repo_bytes=after,
            added_bytes=after - before,
            detail=detail,
        )
        return job, result


def _agent_online(listing: object, vm_id: str) -> bool:
    """Whether `coffer agents --json` output shows `vm_id` connected.

    Accepts a list of agents or an object holding one; an agent counts as online unless a
    `connected`/`online` field is false or a `state`/`status` field says it is not.
    """
    if isinstance(listing, dict):
        listing = next((v for v in listing.values() if isinstance(v, list)), [])
    if not isinstance(listing, list):
        return False
    for agent in listing:
        if not isinstance(agent, dict) or vm_id not in (agent.get("vm_id"), agent.get("id")):
            continue
        for key in ("connected", "online"):
            if key in agent and not agent[key]:
                return False
        state = str(agent.get("state", agent.get("status", ""))).lower()
        return state not in ("offline", "disconnected", "unknown")
    return False


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM `proc`, wait, then SIGKILL its whole session (a Mosquitto child included)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
