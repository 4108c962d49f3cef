"""The scheduler benchmark: what 1,000 protected VMs' daily schedules cost an idle controller.

    python -m tests.bench.scheduler [--seconds 60] [--settle 5] [--items 1000] [--policies 10]
                                    [--repeat 25] [--workdir /tmp] [--keep] [--json]

It measures the real `coffer-controller` process, in this order:

1. A PKI and a controller in a temporary directory (`tests.cluster.Cluster`), vault ``bench``
   (region ``bench``) created with the CLI, so it has its default policy. Then the *baseline*:
   that controller's CPU over an idle window with no protected item.
2. The controller is stopped and its catalog seeded directly (sqlite3): `--items` enrolled VMs
   of region ``bench`` (their agents are never started: nothing is due, so none is needed), and
   as many items in state ``Protected`` spread over `--policies` daily policies in different
   time zones. Their slots are spread over the day but kept clear of this run (none falls from
   seeding until well after the last window), and each item's `last_slot` is its most recent
   slot, so nothing is due when the controller starts.
3. The controller is started again; `coffer items --vault bench --json` must list every item
   with a next backup time; after `--settle` seconds its CPU is measured over the same idle
   window; `coffer job list` afterwards must show that no job started.
4. The named peer, in the same run: a naive polling scheduler, the common design that wakes
   every second and asks every item's schedule whether a slot has passed
   (`Schedule.last_run_at_or_before`, the same `shared.policy.Schedule` objects, one per
   policy, loaded from the same catalog), run in its own process for the same window.
5. In-process, the cost of one scheduling decision with `controller.scheduler.Plan`: building
   the plan for every item, `due()` at a slot where every item is due at once and where one
   is, `due()` when nothing is, `next_wakeup()`, and one tick of the naive poller.

A window's figures come from /proc: CPU is utime + stime of every thread (clock ticks, 10 ms
each), wakeups are the threads' voluntary context switches (each is one sleep that ended),
RSS is VmRSS at the end. Per-thread CPU says which thread spent what. The controller's private
Mosquitto (its child) is measured beside it and shown apart; the figure the issue asks for is
the controller's.

Run by hand, never as a test (tests/test_bench_scheduler.py checks its building blocks). It
needs `mosquitto` on PATH, like the controller does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time as clock
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from rich.table import Table

from controller.pruning import MAINTENANCE_AT
from controller.scheduler import Plan
from shared.model import ItemState
from shared.policy import DailyRule, Frequency, Policy, Retention, Schedule
from shared.version import coffer_version
from tests.bench.measure import proc_cpu_s, proc_rss_bytes
from tests.bench.report import MiB, console, notes
from tests.cluster import Cluster, Process

ROOT = Path(__file__).resolve().parents[2]
VAULT = "bench"
REGION = "bench"
SERVICE = "bench"
# A policy per zone: whole-hour, half-hour, southern-hemisphere and no-DST offsets.
ZONES = (
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Asia/Tokyo",
    "Australia/Sydney",
    "Asia/Kolkata",
    "America/Los_Angeles",
    "Europe/London",
    "America/Sao_Paulo",
    "Asia/Singapore",
)
_SECOND = 1.0
_MINUTE = 60.0
_DAY = 86400.0
# Time kept clear of slots around the run, beyond the windows themselves: controller starts
# and stops, CLI calls, and the poller's start.
_SLACK = 240.0
POLLER_READY = "poller ready"


# --- the catalog's content ---------------------------------------------------------------------


def bench_policies(now: float, clear_s: float, count: int) -> list[Policy]:
    """`count` daily policies whose slots fall outside [now - 2 min, now + clear_s].

    Each runs once a day at its own time in its own zone (`ZONES`, in turn); the times are
    spread evenly over the rest of the day. A policy whose slot a DST change would move into
    the kept-clear span is refused (it cannot happen within a day but on a change day).
    """
    if clear_s > _DAY - 2 * 3600:
        raise ValueError(f"a run of {clear_s / 3600:.1f} h leaves no part of the day for slots")
    start, end = now - 2 * _MINUTE, now + clear_s
    first = end + 10 * _MINUTE
    step = (_DAY - (first - now) - 20 * _MINUTE) / count
    policies: list[Policy] = []
    for i in range(count):
        zone = ZONES[i % len(ZONES)]
        local = datetime.fromtimestamp(first + i * step, ZoneInfo(zone))
        at = time(local.hour, local.minute)
        schedule = Schedule(Frequency.DAILY, (at,), timezone=zone)
        clash = list(schedule.runs_between(_at(start), _at(end)))
        if clash:
            raise ValueError(f"{schedule.describe()} runs at {clash[0]}, inside this run")
        city = zone.rsplit("/", 1)[-1]
        name = f"daily-{i:02d}-{at:%H%M}-{city}"
        policies.append(Policy(name, schedule, Retention(DailyRule(30))))
    return policies


@dataclass(frozen=True)
class Seeded:
    """What `seed_catalog` wrote."""

    items: int
    policies: list[Policy]
    # Each policy's next slot after seeding (UTC seconds), by policy name.
    next_slots: dict[str, float]


def seed_catalog(catalog: Path, policies: Sequence[Policy], items: int, now: float) -> Seeded:
    """Enroll `items` VMs of region `REGION` and protect them in vault `VAULT`, round robin over
    `policies`, each with its most recent slot as `last_slot` (so nothing is due at `now`).

    The vault must exist (created through the controller, with its default policy) and the
    controller must be stopped.
    """
    db = sqlite3.connect(catalog)
    try:
        db.execute("PRAGMA foreign_keys=ON")
        version = coffer_version()
        with db:  # one transaction
            db.executemany(
                "INSERT INTO policies (vault, name, spec, created_at, updated_at)"
                " VALUES (?,?,?,?,?)",
                [(VAULT, p.name, json.dumps(p.to_dict()), now, now) for p in policies],
            )
            last = {p.name: _last_slot(p.schedule, now) for p in policies}
            agents, disks, rows = [], [], []
            for i in range(items):
                vm_id = vm_name(i)
                policy = policies[i % len(policies)]
                agents.append(
                    (vm_id, f"app-{i:04d}", SERVICE, REGION, f"{vm_id}.bench", version, now, now)
                )
                disks.append((vm_id, "root", "/dev/vda", 20 << 30))
                slot = last[policy.name]
                week_ago, backed_up = now - 7 * _DAY, slot + 10 * _MINUTE
                state = ItemState.PROTECTED.value
                rows.append(
                    (
                        vm_id,
                        VAULT,
                        state,
                        policy.name,
                        week_ago,
                        week_ago,
                        slot,
                        backed_up,
                        "Completed",
                    )
                )
            db.executemany(
                "INSERT INTO agents (vm_id, name, service, region, hostname, agent_version,"
                " first_seen, last_seen) VALUES (?,?,?,?,?,?,?,?)",
                agents,
            )
            db.executemany(
                "INSERT INTO disks (vm_id, name, path, size_bytes) VALUES (?,?,?,?)", disks
            )
            db.executemany(
                "INSERT INTO items (vm_id, vault, state, policy, registered_at, protected_at,"
                " last_slot, last_backup_at, last_backup_status) VALUES (?,?,?,?,?,?,?,?,?)",
                rows,
            )
    finally:
        db.close()
    next_slots = {p.name: p.schedule.next_run_after(_at(now)).timestamp() for p in policies}
    return Seeded(items, list(policies), next_slots)


def vm_name(i: int) -> str:
    return f"bench-vm-{i:04d}"


@dataclass
class Entry:
    """A protected item as a scheduler holds it: its schedule and the last slot it ran."""

    key: str
    schedule: Schedule
    last_slot: float


def load_entries(catalog: Path) -> list[Entry]:
    """The catalog's protected items, one `Schedule` object per policy (shared, as the
    controller's plan shares them), read-only."""
    db = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT i.vm_id, i.state, i.last_slot, p.vault, p.name, p.spec FROM items i"
            " JOIN policies p ON p.vault = i.vault AND p.name = i.policy ORDER BY i.vm_id"
        ).fetchall()
    finally:
        db.close()
    schedules: dict[tuple[str, str], Schedule] = {}
    entries = []
    for vm_id, state, last_slot, vault, name, spec in rows:
        if not ItemState(state).protected:
            continue
        if (vault, name) not in schedules:
            schedules[vault, name] = Policy.from_dict(json.loads(spec)).schedule
        entries.append(Entry(vm_id, schedules[vault, name], float(last_slot)))
    return entries


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _last_slot(schedule: Schedule, now: float) -> float:
    slot = schedule.last_run_at_or_before(_at(now))
    assert slot is not None
    return slot.timestamp()


# --- the peer: a naive polling scheduler -------------------------------------------------------


def poll_once(entries: Sequence[Entry], now: datetime) -> int:
    """One tick of the naive scheduler: ask every item's schedule whether a slot has passed."""
    due = 0
    for entry in entries:
        latest = entry.schedule.last_run_at_or_before(now)
        if latest is not None and latest.timestamp() > entry.last_slot:
            entry.last_slot = latest.timestamp()
            due += 1
    return due


def poller(catalog: Path, limit_s: float) -> int:
    """The peer's process: a tick every second (on the second) over every protected item.

    It exits by itself after `limit_s`, so it outlives no benchmark that died."""
    entries = load_entries(catalog)
    print(f"{POLLER_READY}: {len(entries)} items", flush=True)
    deadline = clock.monotonic() + limit_s
    ticks = due = 0
    while clock.monotonic() < deadline:
        # A peer, not Coffer's code: it reads the wall clock where it decides.
        due += poll_once(entries, datetime.now(UTC))
        ticks += 1
        clock.sleep(_SECOND - clock.time() % _SECOND)
    print(f"poller done: {ticks} ticks, {due} due", flush=True)
    return 0


# --- watching a process over an idle window ----------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class _Thread:
    name: str
    cpu_s: float
    wakeups: int


def _threads(pid: int) -> dict[int, _Thread]:
    """Every thread of `pid`: its name, CPU seconds and voluntary context switches so far.

    CPU is the scheduler's `se.sum_exec_runtime` (ns precision) where the kernel shows it in
    /proc/PID/task/TID/sched, else utime + stime in ticks. The main thread is named "main"."""
    found: dict[int, _Thread] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
            sched = (task / "sched").read_text() if (task / "sched").exists() else ""
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / _TICK
        for line in sched.splitlines():
            if line.startswith("se.sum_exec_runtime"):
                cpu = float(line.split(":")[1]) / 1e3  # milliseconds
        wakeups = 0
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                wakeups = int(line.split()[1])
        tid = int(task.name)
        name = "main" if tid == pid else stat[stat.index("(") + 1 : stat.rindex(")")]
        found[tid] = _Thread(name, cpu, wakeups)
    return found


def children(pid: int) -> list[int]:
    """The PIDs of `pid`'s child processes."""
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return pids


@dataclass
class ThreadUse:
    """What the threads of one name did over a window."""

    name: str
    threads: int = 0
    cpu_s: float = 0.0
    wakeups: int = 0


@dataclass(frozen=True)
class Idle:
    """What one process did over an idle window."""

    process: str
    items: int
    window_s: float
    cpu_s: float  # utime + stime, all threads, in clock ticks (the headline figure)
    on_cpu_s: float  # the same from the threads' precise run time (threads alive at the end)
    wakeups: int  # voluntary context switches, all threads: each is one sleep that ended
    rss: int  # bytes, at the end of the window
    threads: list[ThreadUse] = field(default_factory=list)  # busiest first
    log_lines: list[str] = field(default_factory=list)  # what it logged during the window

    @property
    def cpu_share(self) -> float:
        """CPU time as a share of one core."""
        return self.cpu_s / self.window_s if self.window_s else 0.0

    @property
    def wakeups_per_s(self) -> float:
        return self.wakeups / self.window_s if self.window_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out |= {"cpu_share": self.cpu_share, "wakeups_per_s": self.wakeups_per_s}
        return out


@dataclass(frozen=True)
class Watched:
    process: str
    pid: int
    items: int
    log: Path | None = None


def watch_idle(watched: Sequence[Watched], seconds: float) -> list[Idle]:
    """Each process's CPU, wakeups and RSS over the next `seconds` (all sampled together)."""
    cpu0 = {w.pid: proc_cpu_s(w.pid) for w in watched}
    threads0 = {w.pid: _threads(w.pid) for w in watched}
    logs0 = {w.pid: w.log.stat().st_size if w.log else 0 for w in watched}
    started = clock.monotonic()
    clock.sleep(seconds)
    window = clock.monotonic() - started
    found = []
    for w in watched:
        cpu = proc_cpu_s(w.pid) - cpu0[w.pid]
        by_name: dict[str, ThreadUse] = {}
        for tid, t in _threads(w.pid).items():
            before = threads0[w.pid].get(tid, _Thread(t.name, 0.0, 0))
            use = by_name.setdefault(t.name, ThreadUse(t.name))
            use.threads += 1
            use.cpu_s += t.cpu_s - before.cpu_s
            use.wakeups += t.wakeups - before.wakeups
        threads = sorted(by_name.values(), key=lambda u: (-u.cpu_s, -u.wakeups))
        on_cpu = sum(u.cpu_s for u in threads)
        wakeups = sum(u.wakeups for u in threads)
        logged: list[str] = []
        if w.log is not None:
            with w.log.open("rb") as f:
                f.seek(logs0[w.pid])
                logged = f.read().decode(errors="replace").splitlines()
        rss = proc_rss_bytes(w.pid)
        found.append(Idle(w.process, w.items, window, cpu, on_cpu, wakeups, rss, threads, logged))
    return found


# --- the cost of one decision, in-process ------------------------------------------------------


def _median_s(run: Callable[[], object], prepare: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        prepare()
        started = clock.perf_counter()
        run()
        times.append(clock.perf_counter() - started)
    return statistics.median(times)


def decision_costs(entries: Sequence[Entry], now: float, repeat: int) -> dict[str, float]:
    """Seconds (median of `repeat`) of the plan's operations over `entries` at time `now`."""
    n = len(entries)

    def build(over: Sequence[Entry]) -> Plan:
        plan = Plan()
        for e in over:
            plan.set(e.key, e.schedule, e.last_slot)
        return plan

    # Every item on one schedule with one last slot: all are due at the next slot at once.
    one = entries[0].schedule
    last = _last_slot(one, now)
    together = [Entry(e.key, one, last) for e in entries]
    slot = one.next_run_after(_at(last)).timestamp()
    # One item due a minute before every other item's next slot.
    earliest = min(e.schedule.next_run_after(_at(e.last_slot)).timestamp() for e in entries)
    early_at = _at(earliest - _MINUTE)
    early = Schedule(Frequency.DAILY, (time(early_at.hour, early_at.minute),), timezone="UTC")
    lone_slot = _last_slot(early, early_at.timestamp())
    lone = Entry(entries[0].key, early, _last_slot(early, lone_slot - _SECOND))
    single = [lone, *entries[1:]]

    plans: list[Plan] = []

    def fresh(over: Sequence[Entry]) -> Callable[[], None]:
        def prepare() -> None:
            plans[:] = [build(over)]

        return prepare

    def due_at(when: float, expect: int) -> Callable[[], object]:
        def run() -> object:
            got = plans[0].due(when)
            assert len(got) == expect, f"{len(got)} due, expected {expect}"
            return got

        return run

    def nothing() -> None:
        return None

    spread = build(entries)
    now_dt = _at(now)
    copies = [Entry(e.key, e.schedule, e.last_slot) for e in entries]
    return {
        "build_plan": _median_s(lambda: build(entries), nothing, repeat),
        "due_all": _median_s(due_at(slot, n), fresh(together), repeat),
        "due_one": _median_s(due_at(lone_slot, 1), fresh(single), repeat),
        "due_none": _median_s(lambda: spread.due(now), nothing, repeat),
        "next_wakeup": _median_s(spread.next_wakeup, nothing, repeat),
        "poll_tick": _median_s(lambda: poll_once(copies, now_dt), nothing, repeat),
    }


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Result:
    args: dict[str, Any]
    machine: dict[str, Any]
    idle: list[Idle] = field(default_factory=list)
    decisions: dict[str, float] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def idle_of(self, process: str, items: int) -> Idle | None:
        return next((i for i in self.idle if (i.process, i.items) == (process, items)), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "args": self.args,
            "machine": self.machine,
            "idle": [i.as_dict() for i in self.idle],
            "decisions_s": self.decisions,
            "checks": self.checks,
            "notes": self.notes,
        }


def _say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def _maintenance_clash(start: float, span: float) -> bool:
    """Whether the controller's daily vault maintenance falls in [start, start + span]."""
    maintenance = Schedule(Frequency.DAILY, (MAINTENANCE_AT,), timezone="UTC")
    return bool(list(maintenance.runs_between(_at(start), _at(start + span))))


def _watch_controller(cluster: Cluster, items: int, seconds: float) -> list[Idle]:
    pid = cluster.controller.pid
    watched = [Watched("controller", pid, items, cluster.controller.log)]
    watched += [Watched("mosquitto (controller's child)", c, items) for c in children(pid)]
    return watch_idle(watched, seconds)


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.stdout.strip()


def bench(args: argparse.Namespace, work: Path) -> Result:
    result = Result(
        args={k: str(v) for k, v in vars(args).items() if k != "poll_catalog"},
        machine={
            "cores": os.cpu_count(),
            "linux": platform.release(),
            "python": platform.python_version(),
            "clock_tick_s": 1 / _TICK,
            "load_at_start": os.getloadavg(),
            "commit": _git("rev-parse", "--short", "HEAD"),
            "uncommitted": _git("status", "--porcelain", "--", "controller", "shared").splitlines(),
        },
    )
    seconds, settle = args.seconds, args.settle
    # Baseline, controller with items, poller: three windows, each with its settling.
    whole = 3 * (seconds + settle) + 2 * _SLACK
    if _maintenance_clash(clock.time(), whole):
        raise SystemExit(
            "the controller's daily vault maintenance (03:30 UTC) would run during this run "
            f"(about {whole / 60:.0f} min from now) and its Prune job would be measured: "
            "start the benchmark after it"
        )
    poller_proc: Process | None = None
    with Cluster(work / "coffer") as cluster:
        cluster.coffer("vault", "create", VAULT, "--region", REGION)
        _say(f"baseline: controller with vault {VAULT!r} and no item, {seconds:g} s window")
        clock.sleep(settle)
        result.idle += _watch_controller(cluster, 0, seconds)

        cluster.stop_controller()
        now = clock.time()
        policies = bench_policies(now, 2 * (seconds + settle) + 2 * _SLACK, args.policies)
        seeded = seed_catalog(cluster.root / "state" / "catalog.sqlite", policies, args.items, now)
        nearest = min(seeded.next_slots.values())
        result.notes.append(
            f"catalog: {args.items} VMs enrolled in region {REGION!r} (agents never started), "
            f"{args.items} items Protected in vault {VAULT!r}, round robin over "
            f"{len(policies)} daily policies: " + "; ".join(p.schedule.describe() for p in policies)
        )
        result.notes.append(
            f"nearest slot {_at(nearest):%Y-%m-%d %H:%M} UTC, {(nearest - now) / 60:.0f} min "
            "after seeding: every window ends before it"
        )

        started = clock.monotonic()
        cluster.start_controller()
        result.checks["controller_start_s"] = clock.monotonic() - started
        listed = cluster.coffer("items", "--vault", VAULT)
        planned = [i for i in listed if ItemState(i["state"]).protected and i.get("next_backup_at")]
        result.checks["items_listed"] = len(listed)
        result.checks["items_with_next_backup"] = len(planned)
        if len(planned) != args.items:
            raise SystemExit(f"the controller plans {len(planned)} items, not {args.items}")
        _say(f"controller plans {len(planned)} items; {seconds:g} s window")
        clock.sleep(settle)
        result.idle += _watch_controller(cluster, args.items, seconds)
        jobs = cluster.coffer("job", "list", "--vault", VAULT, "--limit", "1000")
        result.checks["jobs_started"] = len(jobs)
        cluster.stop_controller()

    catalog = work / "coffer" / "state" / "catalog.sqlite"
    _say(f"peer: naive 1 s poller over the same {args.items} schedules, {seconds:g} s window")
    try:
        poller_proc = Process(
            "poller",
            [
                *(sys.executable, "-m", "tests.bench.scheduler"),
                *("--poll-catalog", str(catalog), "--seconds", str(seconds + settle + _SLACK)),
            ],
            work / "poller.log",
        )
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        poller_proc.start(env={**os.environ, "PYTHONPATH": path})
        poller_proc.wait_for_line(POLLER_READY)
        clock.sleep(settle)
        result.idle += watch_idle(
            [Watched("naive 1 s poller", poller_proc.pid, args.items)], seconds
        )
    finally:
        if poller_proc is not None:
            poller_proc.stop(signal.SIGTERM)

    _say(f"decisions: Plan in-process, median of {args.repeat}")
    entries = load_entries(catalog)
    result.decisions = decision_costs(entries, clock.time(), args.repeat)
    result.machine["load_at_end"] = os.getloadavg()
    return result


# --- the report --------------------------------------------------------------------------------


def _cpu(idle: Idle) -> str:
    if idle.cpu_s == 0:
        return "0 (< 1 tick)"
    return f"{idle.cpu_s:.2f}"


def _share(idle: Idle) -> str:
    return f"{idle.cpu_share:.3%}"


def _threads_text(idle: Idle, top: int = 4) -> str:
    parts = []
    for use in [u for u in idle.threads if u.cpu_s or u.wakeups][:top]:
        count = f" ({use.threads})" if use.threads > 1 else ""
        parts.append(f"{use.name}{count} {use.cpu_s * 1e3:.1f}/{use.wakeups}")
    return ", ".join(parts) if parts else "—"


def idle_table(result: Result) -> Table:
    seconds = result.idle[0].window_s if result.idle else 0.0
    table = Table(
        title=f"Idle between slots: CPU over a {seconds:.0f} s window", title_justify="left"
    )
    table.add_column("process", justify="left")
    table.add_column("protected items", justify="right")
    table.add_column("CPU s", justify="right")
    table.add_column("on-CPU ms", justify="right")
    table.add_column("% of a core", justify="right")
    table.add_column("wakeups/s", justify="right")
    table.add_column("RSS MiB", justify="right")
    table.add_column("CPU ÷ controller", justify="right")
    table.add_column("threads: on-CPU ms / wakeups", justify="left")
    ours = result.idle_of("controller", int(result.args.get("items", 0)))
    for idle in result.idle:
        ratio = ""
        if ours is not None and idle.process.startswith("naive"):
            if ours.cpu_s > 0:
                ratio = f"{idle.cpu_s / ours.cpu_s:,.0f}x"
            else:  # below one tick: the ratio is at least this
                ratio = f"≥ {idle.cpu_s * _TICK:,.0f}x"
        table.add_row(
            idle.process,
            f"{idle.items:,}",
            _cpu(idle),
            f"{idle.on_cpu_s * 1e3:,.1f}",
            _share(idle),
            f"{idle.wakeups_per_s:.1f}",
            f"{idle.rss / MiB:.0f}",
            ratio,
            _threads_text(idle),
        )
    return table


def _duration(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:,.2f} ms"
    return f"{seconds * 1e6:,.1f} µs"


def decisions_table(result: Result, items: int, repeat: int) -> Table:
    table = Table(
        title=f"One scheduling decision, in-process (median of {repeat})", title_justify="left"
    )
    table.add_column("operation", justify="left")
    table.add_column("time", justify="right")
    table.add_column("per item", justify="right")
    d = result.decisions
    rows = [
        (f"build the plan: Plan.set for {items:,} items", d["build_plan"], items),
        (f"Plan.due() at a slot, {items:,} of {items:,} due", d["due_all"], items),
        (f"Plan.due() at a slot, 1 of {items:,} due", d["due_one"], 1),
        (f"Plan.due() between slots, 0 of {items:,} due", d["due_none"], 0),
        ("Plan.next_wakeup()", d["next_wakeup"], 0),
        (f"peer: one 1 s poll tick over {items:,} items", d["poll_tick"], items),
    ]
    for name, seconds, per in rows:
        table.add_row(name, _duration(seconds), _duration(seconds / per) if per else "")
    return table


def report(result: Result, items: int, repeat: int) -> None:
    out = console()
    m = result.machine
    load0 = ", ".join(f"{x:.2f}" for x in m["load_at_start"])
    load1 = ", ".join(f"{x:.2f}" for x in m.get("load_at_end", ()))
    dirty = f", uncommitted changes in {len(m['uncommitted'])} files" if m["uncommitted"] else ""
    out.print(
        f"machine: {m['cores']} cores, Linux {m['linux']}, Python {m['python']}; commit "
        f"{m['commit']}{dirty}; load average at start {load0}, at end {load1}"
    )
    c = result.checks
    checks = [
        f"controller restart with {items:,} protected items: ready in "
        f"{c['controller_start_s']:.1f} s",
        f"`coffer items --vault {VAULT} --json`: {c['items_listed']:,} items, "
        f"{c['items_with_next_backup']:,} protected with a next backup time",
        f"`coffer job list --vault {VAULT}` after the window: {c['jobs_started']} jobs "
        "(nothing was due, nothing started)",
    ]
    for idle in result.idle:
        if idle.log_lines:
            checks.append(
                f"{idle.process} ({idle.items} items) logged {len(idle.log_lines)} lines in "
                "its window:\n" + "\n".join(idle.log_lines[-5:])
            )
    out.print(notes(result.notes + checks))
    out.print(idle_table(result))
    out.print(
        "CPU s: utime + stime of all the process's threads over the window, from "
        f"/proc/PID/stat (one tick = {1 / _TICK * 1e3:.0f} ms). On-CPU ms: the same from the "
        "threads' se.sum_exec_runtime (/proc/PID/task/TID/sched, ns precision). Wakeups: "
        "voluntary context switches of all its threads. RSS: VmRSS at the window's end. The "
        "naive poller wakes every second and calls Schedule.last_run_at_or_before for every "
        "item."
    )
    baseline, ours = result.idle_of("controller", 0), result.idle_of("controller", items)
    if baseline is not None and ours is not None:
        extra = ours.on_cpu_s - baseline.on_cpu_s
        out.print(
            f"Scheduling {items:,} items, controller with them minus without: "
            f"{extra * 1e3:+.1f} ms on-CPU over {ours.window_s:.0f} s "
            f"({extra / ours.window_s * 1e3:+.2f} ms per second), "
            f"{ours.wakeups_per_s - baseline.wakeups_per_s:+.1f} wakeups/s."
        )
    out.print(decisions_table(result, items, repeat))


# --- the command -------------------------------------------------------------------------------


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.scheduler",
        description="What 1,000 protected VMs' daily schedules cost the idle controller, "
        "against a naive 1 s polling scheduler.",
    )
    p.add_argument("--seconds", type=float, default=60.0, help="idle window (60)")
    p.add_argument("--settle", type=float, default=5.0, help="wait before each window (5)")
    p.add_argument("--items", type=int, default=1000, help="protected VMs (1000)")
    p.add_argument("--policies", type=int, default=10, help="daily policies (10)")
    p.add_argument("--repeat", type=int, default=25, help="in-process repetitions (25)")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the directory (logs, catalog)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    # The peer's own process runs this module with this option.
    p.add_argument("--poll-catalog", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.settle < 0 or args.items < 1 or args.repeat < 1:
        p.error("--seconds and --items and --repeat must be positive, --settle not negative")
    if not 1 <= args.policies <= args.items:
        p.error("--policies must be 1 to --items")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(argv)
    if args.poll_catalog is not None:
        return poller(args.poll_catalog, args.seconds)
    if shutil.which("mosquitto") is None:
        print("mosquitto is not on PATH: the controller needs it", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="coffer-bench-scheduler-", dir=args.workdir))
    try:
        result = bench(args, work)
    finally:
        if args.keep:
            _say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        report(result, args.items, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
