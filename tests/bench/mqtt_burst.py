"""The MQTT burst benchmark: does the controller's status monitor keep up when a fleet connects?

    python -m tests.bench.mqtt_burst [--agents 2000] [--within 6] [--progress 4] [--workers 4]
                                     [--retained 5000] [--json]

All real: a fresh Coffer PKI with one agent certificate per VM, the controller's private
Mosquitto (`controller.broker.PrivateBroker`, the configuration Coffer deploys), the
controller's `StatusMonitor` in this process, and real `agent.status.StatusPublisher` clients
in `--workers` processes. Two phases:

1. *Replay* (with `--retained R`): R VMs' retained presences are on the broker before the
   monitor connects, as when a controller restarts beside a running fleet; all of them reach
   it the moment it subscribes. Measured: how long until it has handled every one (its
   subscription's throughput, nothing else in the way), and whether any were lost.
2. *Burst*: `--agents` agents connect, each at a random moment within `--within` seconds (TLS
   handshake, retained presence `online` at QoS 1), and each then publishes `--progress`
   progress reports of its one job a quarter of a second apart (an agent's real cadence).
   Measured: messages the monitor handled against what the agents sent, the rate over the
   burst, agents whose presence and jobs whose *last* progress never arrived, and whether
   Mosquitto logged that it dropped messages for the controller ("Outgoing messages are being
   dropped for client coffer-controller"). Progress is QoS 0 and coalesces at the sender while
   its connection is not up, so "handled" may trail "sent" without a drop; a missing last
   value is a real loss.

With `--busy F`, the monitor's event loop is kept busy a fraction F of the time (blocked in
slices of up to 100 ms), as the controller's is by the same agents' gRPC sessions during a
reconnect storm: what made Mosquitto drop the controller's messages in issue 13.

The load generators share the machine with the monitor and the broker, so on a small machine
they are what limits the burst; the replay phase has no such limit. Run by hand, never as a
timed test; tests/test_mqtt_hostile.py runs the replay at a small scale as a regression test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import aiomqtt

from agent.status import StatusPublisher
from controller.broker import PrivateBroker
from controller.pki import init_pki, issue_agent
from controller.status import StatusMonitor
from shared.status import Presence, PresenceState, TopicKind, parse_topic, utc_now
from shared.tls import TlsFiles, mqtt_ssl_context

PROGRESS_INTERVAL = 0.25
QUIET_SECONDS = 3.0  # a phase ends once everything arrived, or nothing new for this long
DROPPED = "Outgoing messages are being dropped for client coffer-controller"


def vm_name(n: int) -> str:
    return f"bench-{n:05d}"


def seed_name(n: int) -> str:
    return f"seed-{n:05d}"


def job_name(vm_id: str) -> str:
    return f"job-{vm_id}"


class CountingMonitor(StatusMonitor):
    """The controller's monitor, counting every message it is handed, by kind, with times."""

    def __init__(self, tls: TlsFiles) -> None:
        super().__init__(tls)
        self.counts: Counter[str] = Counter()
        self.first: float | None = None
        self.last: float | None = None

    def _on_message(self, topic: str, payload: object, retain: bool) -> None:
        now = time.monotonic()
        self.first = self.first if self.first is not None else now
        self.last = now
        self.counts[str(parse_topic(topic).kind)] += 1
        super()._on_message(topic, payload, retain)

    def reset(self) -> None:
        self.counts.clear()
        self.first = self.last = None


@dataclass
class Result:
    agents: int
    within_s: float
    progress_each: int
    retained: int
    workers: int
    busy: float
    replay_handled: int = 0
    replay_s: float = 0.0
    replay_per_s: float = 0.0
    connected: int = 0
    presence_handled: int = 0
    progress_handled: int = 0
    burst_s: float = 0.0
    burst_per_s: float = 0.0
    missing_presence: int = 0
    missing_last_progress: int = 0
    broker_dropped: bool = False
    broker_rss_mib: float = 0.0

    @property
    def presence_sent(self) -> int:
        return self.connected

    @property
    def progress_sent(self) -> int:
        return self.connected * self.progress_each


# --- the agents' side (worker processes) --------------------------------------------------


async def _agent(
    vm_id: str, certs: Path, broker: tuple[str, int], delay: float, progress: int, up: list[str]
) -> None:
    await asyncio.sleep(delay)
    tls = TlsFiles.in_dir(certs / vm_id, "agent")
    async with StatusPublisher(vm_id, tls, hostname=f"{vm_id}.bench", agent_version="b") as pub:
        pub.set_broker(*broker)
        while not pub.connected:  # noqa: ASYNC110 - the publisher has no event for it
            await asyncio.sleep(0.05)
        up.append(vm_id)
        for done in range(1, progress + 1):
            pub.publish_progress(job_name(vm_id), "transfer", done, progress, 1.0)
            await asyncio.sleep(PROGRESS_INTERVAL)
        # Stay connected until the measurement is over (the worker then cancels this).
        await asyncio.Event().wait()


async def _worker(args: argparse.Namespace) -> None:
    vm_ids = Path(args.vms).read_text().split()  # noqa: ASYNC240 - before any concurrency
    host, port = args.broker.rsplit(":", 1)
    rng = random.Random(args.seed)
    start = float(args.start)
    up: list[str] = []
    agents = [
        asyncio.ensure_future(
            _agent(
                vm, Path(args.certs), (host, int(port)),
                max(0.0, start - time.time()) + rng.uniform(0, args.within), args.progress, up,
            )
        )
        for vm in vm_ids
    ]  # fmt: skip
    # Until the measuring process closes our stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    print(json.dumps({"connected": len(up)}), flush=True)
    for agent in agents:
        agent.cancel()
    await asyncio.gather(*agents, return_exceptions=True)


# --- the controller's side (this process) -------------------------------------------------


async def _seed_retained(broker: PrivateBroker, controller: TlsFiles, count: int) -> None:
    """`count` VMs' retained presences, published with the controller's own certificate."""
    now = utc_now()
    async with aiomqtt.Client(
        broker.host, broker.port, tls_context=mqtt_ssl_context(controller), timeout=60
    ) as client:
        for n in range(count):
            presence = Presence(seed_name(n), PresenceState.ONLINE, "seed", "bench", now)
            await client.publish(presence.topic, presence.to_json(), qos=1, retain=True)


async def _keep_busy(fraction: float) -> None:
    """Block the event loop `fraction` of the time, in slices of up to 100 ms."""
    while True:
        until = time.monotonic() + 0.1 * fraction
        while time.monotonic() < until:
            pass
        await asyncio.sleep(0.1 * (1 - fraction))


async def _settle(monitor: CountingMonitor, expected: int, patience: float) -> None:
    """Wait until the monitor has handled `expected` messages, or nothing new came for a while."""
    last_total, last_change = -1, time.monotonic()
    while True:
        await asyncio.sleep(0.05)
        total = sum(monitor.counts.values())
        if total != last_total:
            last_total, last_change = total, time.monotonic()
        if total >= expected or time.monotonic() - last_change > patience:
            return


def _rss_mib(pid: int | None) -> float:
    if pid is None:
        return 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run(args: argparse.Namespace, root: Path) -> Result:
    result = Result(args.agents, args.within, args.progress, args.retained, args.workers, args.busy)
    pki, certs = root / "pki", root / "agents"
    init_pki(pki)
    controller = TlsFiles.in_dir(pki, "controller")
    vm_ids = [vm_name(n) for n in range(args.agents)]
    for vm_id in vm_ids:
        issue_agent(pki, vm_id, certs / vm_id)
    async with PrivateBroker(root / "broker", controller) as broker:
        if args.retained:
            await _seed_retained(broker, controller, args.retained)
        monitor = CountingMonitor(controller)
        owners = {job_name(vm): vm for vm in vm_ids}
        monitor.set_job_owner(owners.get)
        async with monitor:
            started = time.monotonic()
            monitor.set_broker(broker.host, broker.port)
            await _settle(monitor, args.retained, QUIET_SECONDS)
            if args.retained:
                presences = monitor.presences()
                result.replay_handled = sum(
                    1 for n in range(args.retained) if seed_name(n) in presences
                )
                result.replay_s = (monitor.last or started) - started
                result.replay_per_s = result.replay_handled / max(result.replay_s, 1e-9)
            monitor.reset()
            busy = asyncio.ensure_future(_keep_busy(args.busy)) if args.busy else None
            start = time.time() + 1.0
            procs = []
            for w in range(args.workers):
                vms_file = root / f"worker-{w}.vms"
                vms_file.write_text("\n".join(vm_ids[w :: args.workers]))
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "tests.bench.mqtt_burst", "--worker",
                        "--vms", str(vms_file), "--certs", str(certs),
                        "--broker", f"{broker.host}:{broker.port}", "--start", str(start),
                        "--within", str(args.within), "--progress", str(args.progress),
                        "--seed", str(w),
                        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    )
                )  # fmt: skip
            expected = args.agents * (1 + args.progress)
            # The agents take `within` to connect and a second per progress report: wait for
            # that, then for the monitor to settle.
            await asyncio.sleep(args.within + 1.0 + args.progress * PROGRESS_INTERVAL)
            await _settle(monitor, expected, QUIET_SECONDS)
            if busy is not None:
                busy.cancel()
            result.presence_handled = monitor.counts[str(TopicKind.PRESENCE)]
            result.progress_handled = monitor.counts[str(TopicKind.PROGRESS)]
            if monitor.first is not None and monitor.last is not None:
                result.burst_s = monitor.last - monitor.first
                handled = result.presence_handled + result.progress_handled
                result.burst_per_s = handled / max(result.burst_s, 1e-9)
            presences = monitor.presences()
            result.missing_presence = sum(1 for vm in vm_ids if vm not in presences)
            result.missing_last_progress = sum(
                1
                for vm in vm_ids
                if (p := monitor.progress(job_name(vm))) is None or p.bytes_done != args.progress
            )
            result.broker_rss_mib = _rss_mib(broker.pid)
            for proc in procs:
                assert proc.stdin is not None
                assert proc.stdout is not None
                proc.stdin.close()
                async for line in proc.stdout:
                    report = json.loads(line)
                    result.connected += int(report.get("connected", 0))
                await proc.wait()
        result.broker_dropped = DROPPED in broker.log_path.read_text(errors="replace")
    return result


def _print(result: Result) -> None:
    rows = []
    if result.retained:
        rows += [
            ("replay: retained presences handled", f"{result.replay_handled} / {result.retained}"),
            ("replay: time, rate", f"{result.replay_s:.2f} s, {result.replay_per_s:,.0f} msg/s"),
        ]
    rows += [
        ("burst: agents connected", f"{result.connected} / {result.agents}"),
        ("burst: presence handled / sent", f"{result.presence_handled} / {result.presence_sent}"),
        ("burst: progress handled / sent", f"{result.progress_handled} / {result.progress_sent}"),
        ("burst: rate", f"{result.burst_per_s:,.0f} msg/s over {result.burst_s:.2f} s"),
        ("burst: agents without presence", str(result.missing_presence)),
        ("burst: jobs without their last progress", str(result.missing_last_progress)),
        ("Mosquitto dropped for the controller", "YES" if result.broker_dropped else "no"),
        ("Mosquitto RSS at the end", f"{result.broker_rss_mib:.1f} MiB"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--within", type=float, default=6.0)
    parser.add_argument("--progress", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--retained", type=int, default=5000)
    parser.add_argument("--busy", type=float, default=0.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    # Worker mode (internal).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vms", help=argparse.SUPPRESS)
    parser.add_argument("--certs", help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--start", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(_worker(args))
        return
    with tempfile.TemporaryDirectory(prefix="coffer-mqtt-burst-", dir=args.workdir) as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    if args.json:
        print(json.dumps({**asdict(result), "presence_sent": result.presence_sent,
                          "progress_sent": result.progress_sent}, indent=2))  # fmt: skip
    else:
        _print(result)


if __name__ == "__main__":
    main()
