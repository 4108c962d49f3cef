"""The fleet simulator: one real controller, thousands of simulated agents, and what it costs.

    python -m tests.bench.fleet [--agents 10000] [--workers 4] [--workdir /var/tmp/coffer-fleet]
                                [--idle 30] [--phase-timeout 120] [--max-seconds 900]
                                [--dispatch N] [--json]

All real but the agents' disks: the controller is `coffer-controller` from this venv with its
private Mosquitto, started on loopback ports with a config in the work directory; each agent
is a mutual-TLS gRPC client with its own certificate from the controller's CA (EC P-256,
issued once and kept in the work directory with the controller's state, so later runs start
from an enrolled fleet), run by `--workers` worker processes (tests/bench/fleet/agents.py),
each holding its share of the fleet's channels on one asyncio loop.

Phases, each bounded by `--phase-timeout`, the whole run by `--max-seconds`:

1. *Storm*: every agent dials at once. Seconds until all are in session, dial attempts per
   agent, refusals with a retry-after. (The first run of a work directory first connects the
   fleet once to record each certificate's first use, which a real fleet has done long ago;
   that warm-up is reported apart.)
2. *Held*: the fleet idles for `--idle` seconds: the controller's and the broker's RSS, their
   CPU as % of one core, and the latency of `coffer agents`' call (ListAgents, first page) and
   of the whole `coffer agents` command.
3. *Dispatch* (with `--dispatch N`): backups of N VMs through the controller, over the
   operator's calls and the agents' sessions, and again with half of those agents dropped
   while their backups wait in the vault's queue (tests/bench/fleet/dispatch.py).
4. *Restart*: the controller is stopped (SIGTERM) and started again. Seconds from the stop
   until every agent is back in session (and from the new controller's "ready"), attempts
   per agent.

Dispatch benchmarks use the same fleet: `commands.answer` is the hook that answers commands
(`--commands fail|done|silent`, `--command-delay`).

The machine is shared: the report states the load average, since the agents' own TLS work
competes with the controller's on a small machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.pki import Authority, init_pki
from shared.rpc import operator_pb2, operator_pb2_grpc
from shared.tls import ROLE_AGENT, Identity, TlsFiles, channel_credentials
from tests.bench.fleet.agents import vm_name
from tests.bench.fleet.dispatch import dispatch

BIN = Path(sys.executable).parent
MiB = 1 << 20
TARGETS = {
    "controller_rss_mib": 1.2 * 1024,
    "idle_cpu_percent": 30.0,
    "list_agents_s": 1.0,
    "storm_s": 20.0,
    "restart_s": 30.0,
    "attempts_per_agent": 2.0,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- certificates --------------------------------------------------------------------------


def prepare_certificates(workdir: Path, agents: int) -> tuple[Path, int]:
    """The CA (made once) and a certificate for each of `agents` VMs (those missing issued
    now); the directory holding them, and how many were issued now."""
    pki = workdir / "pki"
    if not (pki / "ca.key").exists():
        init_pki(pki)
    certs = workdir / "certs"
    certs.mkdir(exist_ok=True)
    (certs / "ca.crt").write_bytes((pki / "ca.crt").read_bytes())
    authority: Authority | None = None
    issued = 0
    for n in range(agents):
        vm = vm_name(n)
        if (certs / f"{vm}.crt").exists():
            continue
        authority = authority or Authority.load(pki)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = authority.issue(Identity(ROLE_AGENT, vm), key.public_key(), timedelta(days=365))
        (certs / f"{vm}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (certs / f"{vm}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued += 1
    return certs, issued


# --- the controller ------------------------------------------------------------------------


@dataclass
class Controller:
    workdir: Path
    port: int = field(default_factory=free_port)
    operator_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.workdir / "controller.log"

    def write_config(self) -> Path:
        path = self.workdir / "controller.toml"
        path.write_text(
            f'listen = "127.0.0.1:{self.port}"\n'
            f'operator_listen = "127.0.0.1:{self.operator_port}"\n'
            f'state_dir = "{self.workdir / "state"}"\n'
            f'pki_dir = "{self.workdir / "pki"}"\n'
        )
        return path

    def start(self, timeout: float = 120.0) -> float:
        """Start it; seconds until it said it is ready."""
        config = self.write_config()
        started = time.monotonic()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(BIN / "coffer-controller"), "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        if "ready" not in line:
            raise RuntimeError(f"the controller did not start: {self.log} says why")
        return time.monotonic() - started

    def stop(self, timeout: float = 60.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def broker_pid(self) -> int | None:
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                if Path(f"/proc/{child}/comm").read_text().strip() == "mosquitto":
                    return int(child)
        return None


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_files(pid: int) -> int:
    """How many descriptors process `pid` has open now (0 once it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0


async def peak_open_files(pid: int, peak: list[int], every: float = 0.5) -> None:
    """Keep `peak[0]` the most descriptors process `pid` held, sampled every `every` s."""
    while True:
        peak[0] = max(peak[0], open_files(pid))
        await asyncio.sleep(every)


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process `pid` so far (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the workers ---------------------------------------------------------------------------


@dataclass
class Worker:
    process: asyncio.subprocess.Process
    first: int
    """The first of its agents (`vm_name(first)`), and how many it runs."""
    count: int
    latest: dict[str, Any] = field(default_factory=dict)

    async def follow(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                self.latest = json.loads(line)

    async def send(self, word: str) -> None:
        """Tell the worker `word`; nothing if it is gone (a dead worker shows in the counts)."""
        assert self.process.stdin is not None
        if self.process.returncode is not None:
            return
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            self.process.stdin.write(f"{word}\n".encode())
            await self.process.stdin.drain()


class Fleet:
    def __init__(self, workers: list[Worker], agents: int) -> None:
        self.workers = workers
        self.agents = agents

    def total(self, key: str) -> int:
        return sum(int(w.latest.get(key, 0)) for w in self.workers)

    def failures(self) -> dict[str, int]:
        """Attempts that ended without a session so far, by how, over every worker."""
        kinds: dict[str, int] = {}
        for worker in self.workers:
            for how, count in worker.latest.get("failures", {}).items():
                kinds[how] = kinds.get(how, 0) + int(count)
        return kinds

    def failure_samples(self) -> dict[str, list[str]]:
        """The first failures of each kind as gRPC core told them, over every worker."""
        samples: dict[str, list[str]] = {}
        for worker in self.workers:
            for how, told in worker.latest.get("samples", {}).items():
                samples.setdefault(how, []).extend(told)
        return samples

    async def send(self, word: str) -> None:
        for worker in self.workers:
            await worker.send(word)

    async def until(self, done: Any, within: float) -> float | None:
        """Seconds until `done()` holds; None if it did not `within` seconds."""
        started = time.monotonic()
        while time.monotonic() - started < within:
            if done():
                return time.monotonic() - started
            await asyncio.sleep(0.1)
        return None

    def all_in_session(self) -> bool:
        return self.total("in_session") >= self.agents

    def none_in_session(self) -> bool:
        return self.total("in_session") == 0

    def cpu_seconds(self) -> float:
        """The simulator's own CPU (every worker's): on a small machine it competes with the
        controller's, and a storm's time is both's."""
        return sum(cpu_seconds(w.process.pid) for w in self.workers if w.process.returncode is None)


async def start_workers(args: argparse.Namespace, certs: Path, port: int) -> Fleet:
    workers = []
    share, extra = divmod(args.agents, args.workers)
    first = 0
    for n in range(args.workers):
        count = share + (1 if n < extra else 0)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.bench.fleet.agents",
            "--target",
            f"127.0.0.1:{port}",
            "--certs",
            str(certs),
            "--first",
            str(first),
            "--count",
            str(count),
            "--max-seconds",
            str(args.max_seconds),
            "--commands",
            args.commands,
            "--command-delay",
            str(args.command_delay),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        workers.append(Worker(process, first, count))
        first += count
    return Fleet(workers, args.agents)


# --- the phases ----------------------------------------------------------------------------


async def storm(
    controller: Controller, fleet: Fleet, within: float, ramp: float = 0.0
) -> dict[str, Any]:
    """Every agent dials at once (or within `ramp` seconds); until all are in session."""
    attempts, refused = fleet.total("attempts"), fleet.total("refused")
    failures = fleet.failures()
    cpu, simulator = cpu_seconds(controller.pid), fleet.cpu_seconds()
    peak = [0]
    sampling = asyncio.create_task(peak_open_files(controller.pid, peak))
    await fleet.send(f"connect {ramp}")
    try:
        took = await fleet.until(fleet.all_in_session, within)
    finally:
        sampling.cancel()
    spent = cpu_seconds(controller.pid) - cpu
    simulated = fleet.cpu_seconds() - simulator
    return {
        "seconds": took,
        # What the machine's load cannot change: the controller's own CPU for the storm.
        "controller_cpu_s": spent,
        "controller_cpu_ms_per_agent": 1000 * spent / fleet.agents,
        "simulator_cpu_ms_per_agent": 1000 * simulated / fleet.agents,
        "in_session": fleet.total("in_session"),
        # Against the controller's open-file limit: a storm's connections outnumber its agents.
        "controller_open_files_peak": peak[0],
        "attempts_per_agent": (fleet.total("attempts") - attempts) / fleet.agents,
        "refused_busy": fleet.total("refused") - refused,
        "failed_attempts": failed_since(failures, fleet.failures()),
    }


def failed_since(before: dict[str, int], now: dict[str, int]) -> dict[str, int]:
    """The attempts that failed between two counts, by how, most first."""
    since = {how: count - before.get(how, 0) for how, count in now.items()}
    return dict(sorted(((h, c) for h, c in since.items() if c), key=lambda kv: -kv[1]))


def operator_tls(workdir: Path) -> TlsFiles:
    """The CA's own operator (admin) identity, made with the CA."""
    pki = workdir / "pki"
    return TlsFiles(ca=pki / "ca.crt", cert=pki / "operator.crt", key=pki / "operator.key")


def list_agents(controller: Controller, workdir: Path) -> dict[str, Any]:
    pki = workdir / "pki"
    tls = operator_tls(workdir)
    target = f"127.0.0.1:{controller.operator_port}"
    calls = []
    try:
        with grpc.secure_channel(target, channel_credentials(tls)) as channel:
            stub = operator_pb2_grpc.OperatorServiceStub(channel)
            for _ in range(3):
                started = time.monotonic()
                reply = stub.ListAgents(operator_pb2.ListAgentsRequest(), timeout=60)
                calls.append(time.monotonic() - started)
    except grpc.RpcError as error:
        return {"rpc_error": f"{error.code()}: {error.details()}"}
    coffer = [str(BIN / "coffer"), "--controller", target, "--tls-dir", str(pki)]
    # What an operator types (the table of the first page), and what a script asks (--json:
    # every VM, page after page).
    cli, cli_s = timed_run([*coffer, "--timeout", "120", "agents"])
    every, every_s = timed_run([*coffer, "--timeout", "120", "agents", "--json"])
    return {
        "rpc_first_s": calls[0],
        "rpc_median_s": statistics.median(calls),
        "agents_listed": len(reply.agents),
        "online_listed": sum(1 for a in reply.agents if a.online),
        "cli_s": cli_s,
        "cli_exit": cli.returncode,
        "cli_error": cli.stderr.strip()[-300:] if cli.returncode else "",
        "cli_json_every_s": every_s,
        "cli_json_listed": len(json.loads(every.stdout)) if every.returncode == 0 else None,
    }


def timed_run(command: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    return done, time.monotonic() - started


async def held(controller: Controller, fleet: Fleet, workdir: Path, idle: float) -> dict[str, Any]:
    broker = controller.broker_pid()
    await asyncio.sleep(5)  # the storm's tail (logging, the first heartbeats) settles
    before = cpu_seconds(controller.pid), cpu_seconds(broker) if broker else 0.0
    started = time.monotonic()
    await asyncio.sleep(idle)
    took = time.monotonic() - started
    after = cpu_seconds(controller.pid), cpu_seconds(broker) if broker else 0.0
    figures: dict[str, Any] = {
        "controller_rss_mib": rss_mib(controller.pid),
        "broker_rss_mib": rss_mib(broker) if broker else None,
        "idle_cpu_percent": 100 * (after[0] - before[0]) / took,
        "broker_idle_cpu_percent": 100 * (after[1] - before[1]) / took if broker else None,
        "in_session": fleet.total("in_session"),
        "worker_rss_mib": [round(rss_mib(w.process.pid)) for w in fleet.workers],
        "load": os.getloadavg(),
    }
    figures["list_agents"] = await asyncio.to_thread(list_agents, controller, workdir)
    return figures


async def restart(controller: Controller, fleet: Fleet, within: float) -> dict[str, Any]:
    attempts, refused = fleet.total("attempts"), fleet.total("refused")
    failures = fleet.failures()
    stopped_at = time.monotonic()
    await asyncio.to_thread(controller.stop)
    stop_s = time.monotonic() - stopped_at
    ready_s = await asyncio.to_thread(controller.start)
    ready_at = time.monotonic()
    cpu, simulator = cpu_seconds(controller.pid), fleet.cpu_seconds()
    took = await fleet.until(fleet.all_in_session, within)
    spent = cpu_seconds(controller.pid) - cpu
    simulated = fleet.cpu_seconds() - simulator
    return {
        "controller_cpu_s": spent,
        "controller_cpu_ms_per_agent": 1000 * spent / fleet.agents,
        "simulator_cpu_ms_per_agent": 1000 * simulated / fleet.agents,
        "stop_s": stop_s,
        "start_to_ready_s": ready_s,
        "seconds_from_stop": None if took is None else ready_at + took - stopped_at,
        "seconds_from_ready": took,
        "in_session": fleet.total("in_session"),
        "attempts_per_agent": (fleet.total("attempts") - attempts) / fleet.agents,
        "refused_busy": fleet.total("refused") - refused,
        "failed_attempts": failed_since(failures, fleet.failures()),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    certs, issued = await asyncio.to_thread(prepare_certificates, workdir, args.agents)
    report: dict[str, Any] = {
        "agents": args.agents,
        "ramp_s": args.ramp,
        "workers": args.workers,
        "certificates_issued_now": issued,
        "certificates_s": time.monotonic() - started,
        "load_before": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    # Written once every agent has been in session: each certificate's first use recorded.
    warm = workdir / f"warm-{args.agents}"
    fresh = not warm.exists()
    controller = Controller(workdir)
    report["controller_start_s"] = await asyncio.to_thread(controller.start)
    fleet = await start_workers(args, certs, controller.port)
    follows = [asyncio.create_task(w.follow()) for w in fleet.workers]
    try:
        async with asyncio.timeout(args.max_seconds):
            if fresh:
                # First use of each certificate is recorded once in the controller's life.
                report["warm_up"] = await storm(
                    controller, fleet, args.phase_timeout * 3, max(args.ramp, 60.0)
                )
                if report["warm_up"]["seconds"] is not None:
                    warm.touch()
                save(report, workdir)
            if not args.no_storm:
                if fleet.total("in_session"):
                    await fleet.send("disconnect")
                    await fleet.until(fleet.none_in_session, args.phase_timeout)
                report["storm"] = await storm(controller, fleet, args.phase_timeout, args.ramp)
                save(report, workdir)
            elif not fresh:
                report["connect"] = await storm(controller, fleet, args.phase_timeout, 60.0)
            report["held"] = await held(controller, fleet, workdir, args.idle)
            save(report, workdir)
            if args.dispatch:
                report["dispatch"] = await dispatch(
                    fleet,
                    f"127.0.0.1:{controller.operator_port}",
                    operator_tls(workdir),
                    args.dispatch,
                )
                save(report, workdir)
            report["restart"] = await restart(controller, fleet, args.phase_timeout)
    finally:
        report["load_after"] = os.getloadavg()
        report["failure_samples"] = fleet.failure_samples()
        try:
            await fleet.send("stop")
            for worker in fleet.workers:
                try:
                    await asyncio.wait_for(worker.process.wait(), 30)
                except TimeoutError:
                    worker.process.kill()
                    await worker.process.wait()
            for task in follows:
                task.cancel()
        finally:
            await asyncio.to_thread(controller.stop)
    report["total_s"] = time.monotonic() - started
    save(report, workdir)
    return report


def save(report: dict[str, Any], workdir: Path) -> None:
    """The report so far, so that a run cut short still leaves its figures."""
    (workdir / "report.json").write_text(json.dumps(report, indent=2))


def verdicts(report: dict[str, Any]) -> list[tuple[str, Any, float, bool]]:
    held, storm_, again = report.get("held", {}), report.get("storm", {}), report.get("restart", {})
    rows: list[tuple[str, Any, float]] = [
        ("controller RSS (MiB)", held.get("controller_rss_mib"), TARGETS["controller_rss_mib"]),
        ("idle CPU (% of a core)", held.get("idle_cpu_percent"), TARGETS["idle_cpu_percent"]),
        (
            "ListAgents, first call (s)",
            held.get("list_agents", {}).get("rpc_first_s"),
            TARGETS["list_agents_s"],
        ),
        (
            "`coffer agents`, a new process (s)",
            held.get("list_agents", {}).get("cli_s"),
            TARGETS["list_agents_s"],
        ),
        ("storm: all in session (s)", storm_.get("seconds"), TARGETS["storm_s"]),
        (
            "storm: attempts per agent",
            storm_.get("attempts_per_agent"),
            TARGETS["attempts_per_agent"],
        ),
        ("restart: all back, from stop (s)", again.get("seconds_from_stop"), TARGETS["restart_s"]),
        (
            "restart: attempts per agent",
            again.get("attempts_per_agent"),
            TARGETS["attempts_per_agent"],
        ),
    ]
    if (sent := report.get("dispatch")) is not None:
        now, queued = sent["backup_now"], sent["dropped_while_queued"]
        rows += [
            (f"backup-now of {now['backups']} VMs returns (s)", now["returned_s"], 1.0),
            ("every one of those agents commanded (s)", now["every_agent_commanded_s"], 5.0),
            (
                f"queued jobs failed, {queued['dropped_agents']} agents dropped",
                sent["jobs_failed_for_absence"],
                0.0,
            ),
        ]
    return [
        (name, value, target, value is not None and value <= target) for name, value, target in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/coffer-fleet"))
    parser.add_argument("--idle", type=float, default=30.0)
    parser.add_argument("--phase-timeout", type=float, default=120.0)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument("--commands", choices=("fail", "done", "silent"), default="fail")
    parser.add_argument("--command-delay", type=float, default=0.0)
    parser.add_argument(
        "--ramp",
        type=float,
        default=0.0,
        help="agents dial within this many seconds instead of at once (a warm-up takes 60 s)",
    )
    parser.add_argument(
        "--no-storm",
        action="store_true",
        help="no storm phase: the fleet connects within 60 s (the warm-up's way), then is held",
    )
    parser.add_argument(
        "--dispatch",
        type=int,
        default=0,
        metavar="N",
        help="after the held phase, backups of N VMs through the controller (dispatch.py)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(json.dumps(report, indent=2))
    print()
    print(f"{'figure':36} {'measured':>10} {'target':>8}  met")
    for name, value, target, met in verdicts(report):
        shown = "-" if value is None else f"{value:.2f}"
        print(f"{name:36} {shown:>10} {target:>8g}  {'yes' if met else 'NO'}")


if __name__ == "__main__":
    main()
