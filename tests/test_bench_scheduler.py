"""The scheduler benchmark's building blocks (tests/bench/scheduler.py), quickly.

The benchmark's figures mean something only if the controller it measures really holds 1,000
protected items whose next backups all lie beyond the run, and if the peer and the in-process
timings do the work they are named for. These check exactly that; the benchmark itself is run
by hand.
"""

from __future__ import annotations

import itertools
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.bench.scheduler import (
    REGION,
    VAULT,
    Entry,
    bench_policies,
    decision_costs,
    load_entries,
    poll_once,
    seed_catalog,
    vm_name,
)
from tests.cluster import Cluster

DAY = 86400.0
CLEAR_S = 900.0  # the run the slots must keep clear of


def _entries(now: float, count: int) -> list[Entry]:
    policies = bench_policies(now, CLEAR_S, 10)
    entries = []
    for i in range(count):
        schedule = policies[i % len(policies)].schedule
        last = schedule.last_run_at_or_before(datetime.fromtimestamp(now).astimezone())
        assert last is not None
        entries.append(Entry(vm_name(i), schedule, last.timestamp()))
    return entries


@pytest.mark.timeout(30)
def test_slots_keep_clear_of_the_run_and_are_spread_over_the_day() -> None:
    now = time.time()
    policies = bench_policies(now, CLEAR_S, 10)
    nexts = sorted(
        p.schedule.next_run_after(datetime.fromtimestamp(now).astimezone()).timestamp()
        for p in policies
    )
    assert nexts[0] > now + CLEAR_S
    assert nexts[-1] < now + DAY
    assert len({p.schedule.timezone for p in policies}) == 10
    assert min(b - a for a, b in itertools.pairwise(nexts)) > 3600


@pytest.mark.timeout(30)
def test_the_peer_finds_nothing_due_now_and_every_item_due_a_day_later() -> None:
    now = time.time()
    entries = _entries(now, 1000)
    assert poll_once(entries, datetime.fromtimestamp(now).astimezone()) == 0
    assert poll_once(entries, datetime.fromtimestamp(now + DAY).astimezone()) == 1000
    assert poll_once(entries, datetime.fromtimestamp(now + DAY).astimezone()) == 0


@pytest.mark.timeout(60)
def test_decision_costs_time_what_they_are_named_for() -> None:
    # decision_costs asserts itself that `due` returned all 100 entries, then exactly one.
    costs = decision_costs(_entries(time.time(), 100), time.time(), repeat=1)
    assert set(costs) == {
        "build_plan",
        "due_all",
        "due_one",
        "due_none",
        "next_wakeup",
        "poll_tick",
    }
    assert all(seconds > 0 for seconds in costs.values())
    assert costs["due_one"] < costs["due_all"]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_the_seeded_catalog_makes_the_controller_plan_exactly_1000_items(tmp_path: Path) -> None:
    with Cluster(tmp_path / "coffer") as cluster:
        cluster.coffer("vault", "create", VAULT, "--region", REGION)
        cluster.stop_controller()
        now = time.time()
        policies = bench_policies(now, CLEAR_S, 10)
        seeded = seed_catalog(cluster.root / "state" / "catalog.sqlite", policies, 1000, now)
        cluster.start_controller()

        items = cluster.coffer("items", "--vault", VAULT)
        assert len(items) == 1000
        assert {i["state"] for i in items} == {"Protected"}
        # Every item's next backup is its policy's next slot, and all lie beyond the run.
        for item in items:
            planned = datetime.fromisoformat(item["next_backup_at"]).timestamp()
            assert planned == seeded.next_slots[item["policy"]], item
            assert planned > now + CLEAR_S
        assert cluster.coffer("job", "list", "--vault", VAULT) == []
        assert len(load_entries(cluster.root / "state" / "catalog.sqlite")) == 1000
