"""The catalog: migrations, persistence across reopen, job filters, recovery points."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from controller.catalog import (
    MIGRATIONS,
    Catalog,
    DiskRecord,
    ItemRecord,
    JobFilter,
    JobRecord,
    PolicyRecord,
    RecoveryPointDiskRecord,
    RecoveryPointRecord,
    RestoreTarget,
    VaultRecord,
)
from shared.errors import NotFound, UnsupportedFormat
from shared.model import Consistency, ItemState, JobStatus, Operation, RestoreMode, Trigger
from shared.policy import default_policy

DEFAULT_POLICY = PolicyRecord("default", "DefaultPolicy", default_policy().to_dict(), 0.0, 0.0)


def job(job_id: str, *, status: str = "Completed", operation: str = "Backup", at: float = 0.0,
        vm: str = "vm-1") -> JobRecord:  # fmt: skip
    return JobRecord(
        id=job_id, operation=operation, status=status, vault="default", vm_id=vm, started_at=at
    )


async def test_a_new_catalog_is_at_the_latest_schema_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    async with Catalog(path) as catalog:
        assert await catalog.schema_version() == len(MIGRATIONS)
        await catalog.create_vault(VaultRecord("default", "local", 1 << 20, 0.0), DEFAULT_POLICY)
        await catalog.upsert_agent(
            vm_id="vm-1", name="vm-1", service="shop", region="eu", hostname="h",
            agent_version="1", disks=[DiskRecord("root", "/dev/vda", 10)], now=100.0,
        )  # fmt: skip
        catalog.touch_agent("vm-1", 200.0)  # buffered, written on close
        await catalog.insert_job(job("j1", status="InProgress", at=100.0))
    async with Catalog(path) as catalog:
        assert await catalog.schema_version() == len(MIGRATIONS)
        [agent] = await catalog.agents()
        assert agent.last_seen == 200.0
        assert agent.disks == (DiskRecord("root", "/dev/vda", 10),)
        assert (await catalog.job("j1")).status == "InProgress"
        # A restart fails what the last run left running, with a reason.
        interrupted = await catalog.fail_interrupted_jobs(300.0, "ControllerRestarted", "stopped")
        assert [(j.id, j.status) for j in interrupted] == [("j1", "Failed")]
        failed = await catalog.job("j1")
        assert (failed.status, failed.ended_at, failed.error_code) == (
            "Failed",
            300.0,
            "ControllerRestarted",
        )


async def test_agents_are_looked_up_by_id_or_name_as_the_whole_listing_has_them(
    tmp_path: Path,
) -> None:
    """The lookups that replaced reading the whole fleet for a few VMs (issue 13) give the
    same records as the listing: one by id, those a name or id can be, names only."""
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        for vm_id, name, service in (
            ("vm-1", "web", "shop"),
            ("vm-2", "web", "blog"),
            ("vm-3", "db", ""),
        ):
            await catalog.upsert_agent(
                vm_id=vm_id, name=name, service=service, region="eu", hostname=f"{vm_id}.h",
                agent_version="1", disks=[DiskRecord("root", "/dev/vda", 10)], now=100.0,
                restore_dirs=[f"/srv/{vm_id}"],
            )  # fmt: skip
        listed = {agent.vm_id: agent for agent in await catalog.agents()}
        assert await catalog.agent("vm-2") == listed["vm-2"]
        assert (await catalog.agent("vm-2")).restore_dirs == ("/srv/vm-2",)  # type: ignore[union-attr]
        assert await catalog.agent("vm-9") is None
        # Every VM a name can mean (both "web"s), and a VM id.
        named = await catalog.agents_named(["web", "vm-3", "nobody"])
        assert sorted(named, key=lambda a: a.vm_id) == [listed[v] for v in ("vm-1", "vm-2", "vm-3")]
        assert await catalog.agent_names(["vm-1", "vm-3", "vm-9"]) == {
            "vm-1": ("shop", "web"),
            "vm-3": ("", "db"),
        }


async def test_a_catalog_from_a_newer_coffer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(UnsupportedFormat):
        async with Catalog(path):
            pass


async def test_job_filters(tmp_path: Path) -> None:
    async with Catalog(tmp_path / "c.sqlite") as catalog:
        await catalog.insert_job(job("a", status="Completed", at=10.0))
        await catalog.insert_job(job("b", status="Failed", at=20.0))
        await catalog.insert_job(job("c", status="Completed", operation="Restore", at=30.0))
        await catalog.insert_job(job("d", status="Completed", at=40.0, vm="vm-2"))

        async def ids(**where: object) -> list[str]:
            return [j.id for j in await catalog.jobs(JobFilter(**where))]  # type: ignore[arg-type]

        assert await ids() == ["d", "c", "b", "a"]  # newest first
        assert await ids(statuses=["Failed"]) == ["b"]
        assert await ids(operations=["Restore"]) == ["c"]
        assert await ids(vm_id="vm-2") == ["d"]
        assert await ids(started_from=20.0, started_to=40.0) == ["c", "b"]
        assert await ids(limit=1) == ["d"]
        with pytest.raises(NotFound):
            await catalog.job("nope")


async def test_recovery_points_in_order(tmp_path: Path) -> None:
    async with Catalog(tmp_path / "c.sqlite") as catalog:
        await catalog.create_vault(VaultRecord("default", "local", 1 << 20, 0.0), DEFAULT_POLICY)
        for n, created in enumerate((5.0, 1.0, 3.0)):
            await catalog.insert_recovery_point(
                RecoveryPointRecord(
                    id=f"rp{n}", vault="default", vm_id="vm-1", job_id=f"j{n}",
                    created_at=created, consistency="crash", bytes_stored=n,
                    disks=(RecoveryPointDiskRecord("root", 10, 4096, 1),),
                )
            )  # fmt: skip
        assert [rp.id for rp in await catalog.recovery_points("vm-1")] == ["rp1", "rp2", "rp0"]
        latest = await catalog.latest_recovery_point("vm-1")
        assert latest is not None
        assert latest.id == "rp0"
        assert (await catalog.recovery_point("rp2")).disks[0].chunk_size == 4096
        assert await catalog.latest_recovery_point("vm-9") is None
        with pytest.raises(NotFound):
            await catalog.recovery_point("nope")


async def test_a_foundation_catalog_upgrades_to_the_vault_workflow(tmp_path: Path) -> None:
    """A catalog of the first release (one vault, recovery points, no items) is migrated so
    that an operator can manage what it holds: its vault has the default policy, and each VM
    with recovery points is an item whose protection is stopped with its data retained."""
    path = tmp_path / "catalog.sqlite"
    db = sqlite3.connect(path)
    db.executescript(f"BEGIN; {MIGRATIONS[0]}; PRAGMA user_version = 1; COMMIT;")
    db.execute("INSERT INTO vaults VALUES ('default', '', 524288, 10.0)")
    db.execute(
        "INSERT INTO recovery_points VALUES ('rp-1', 'default', 'vm-1', 'job-1', 20.0, 'crash', 5)"
    )
    db.commit()
    db.close()
    async with Catalog(path) as catalog:
        assert await catalog.schema_version() == len(MIGRATIONS)
        [policy] = await catalog.policies("default")
        assert (policy.name, policy.spec["retention"]) == ("DefaultPolicy", {"daily": {"days": 30}})
        item = await catalog.item("vm-1")
        assert item is not None
        assert (item.vault, item.state, item.policy) == ("default", "ProtectionStopped", None)
        [rp] = await catalog.recovery_points("vm-1")
        assert (rp.id, rp.kept_by, rp.data_bytes) == ("rp-1", (), 0)


async def test_jobs_of_an_older_catalog_get_typed_columns_from_their_details(
    tmp_path: Path,
) -> None:
    """A vault-workflow catalog (schema 2) kept a backup's trigger, slot, disks and pending
    recovery point in its display details; the migration moves them to their own columns and
    leaves the display information where it was."""
    path = tmp_path / "catalog.sqlite"
    db = sqlite3.connect(path)
    for number, script in enumerate(MIGRATIONS[:2], start=1):
        db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
    rows = [
        # id, operation, status, details
        ("queued", "Backup", "InProgress", {"trigger": "scheduled", "slot": 1_700_000_000.0,
         "disks": [], "recovery_point_id": "rp-q", "phase": "Queued"}),
        ("done", "Backup", "Completed", {"trigger": "manual", "disks": ["root", "data"],
         "recovery_point_id": "rp-d", "frozen_ms": 31.5}),
        ("skipped", "Backup", "Failed", {"trigger": "scheduled", "slot": 1_700_086_400.0}),
        ("register", "Register", "Completed", {"disks": ["root"]}),
    ]  # fmt: skip
    for job_id, operation, status, details in rows:
        db.execute(
            "INSERT INTO jobs (id, operation, status, vault, vm_id, started_at, recovery_point_id,"
            " details) VALUES (?, ?, ?, 'default', 'vm-1', 10.0, ?, ?)",
            (job_id, operation, status, "rp-d" if job_id == "done" else "", json.dumps(details)),
        )
    db.commit()
    db.close()

    async with Catalog(path) as catalog:
        assert await catalog.schema_version() == len(MIGRATIONS)
        queued, done, skipped, register = [
            await catalog.job(job_id) for job_id in ("queued", "done", "skipped", "register")
        ]
    assert (queued.trigger, queued.slot, queued.disks) == ("scheduled", 1_700_000_000.0, ())
    assert (queued.pending_recovery_point_id, queued.recovery_point_id) == ("rp-q", "")
    assert queued.details == {"phase": "Queued"}
    assert (done.trigger, done.slot, done.disks) == (Trigger.MANUAL, None, ("root", "data"))
    assert (done.pending_recovery_point_id, done.recovery_point_id) == ("rp-d", "rp-d")
    assert done.details == {"frozen_ms": 31.5}
    assert (skipped.trigger, skipped.slot, skipped.details) == (
        Trigger.SCHEDULED,
        1_700_086_400.0,
        {},
    )
    # Not a backup: its disks are what an operator read at registration, and stay so.
    assert (register.disks, register.details) == ((), {"disks": ["root"]})


async def test_restores_recorded_before_get_their_target_and_bytes_in_columns(
    tmp_path: Path,
) -> None:
    """A restore of schema 5 (the last before the ways back) kept its source VM and target
    path in its display details and its bytes written in bytes_read; migration 6 gives them
    their columns."""
    path = tmp_path / "catalog.sqlite"
    db = sqlite3.connect(path)
    for number, script in enumerate(MIGRATIONS[:5], start=1):
        db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
    details = {"source_vm": "vm-1", "disk": "root", "target_path": "/r/x.img", "warnings": ["w"]}
    db.execute(
        "INSERT INTO jobs (id, operation, status, vault, vm_id, started_at, bytes_read, disks,"
        " details) VALUES ('r1', 'Restore', 'Completed', 'default', 'vm-2', 1.0, 4096,"
        " '[\"root\"]', ?)",
        (json.dumps(details),),
    )
    db.commit()
    db.close()
    async with Catalog(path) as catalog:
        job = await catalog.job("r1")
        assert (await catalog.vaults()) == []
    assert job.restore == RestoreTarget("vm-1", "vm-2", "/r/x.img", RestoreMode.NEW_IMAGE)
    assert (job.bytes_written, job.disks, job.details) == (4096, ("root",), {"warnings": ["w"]})


async def test_records_carry_enums_read_by_column_name(tmp_path: Path) -> None:
    async with Catalog(tmp_path / "c.sqlite") as catalog:
        await catalog.create_vault(VaultRecord("default", "local", 1 << 20, 0.0), DEFAULT_POLICY)
        # Columns in a new order (as a later migration could leave them) change nothing.
        await catalog.db.executescript(
            "BEGIN; ALTER TABLE jobs RENAME TO old_jobs;"
            " CREATE TABLE jobs AS SELECT bytes_written, bytes_fetched, bytes_compared,"
            " overwrite, restore_mode, target_path, target_vm_id, source_vm_id, requested_by,"
            " details, pending_recovery_point_id, disks, slot,"
            " trigger, recovery_point_id, error_message, error_code, bytes_stored, bytes_sent,"
            " bytes_read, ended_at, started_at, vm_id, vault, status, operation, id"
            " FROM old_jobs; DROP TABLE old_jobs; COMMIT;"
        )
        await catalog.insert_job(
            JobRecord(
                id="j1", operation=Operation.BACKUP, status=JobStatus.FAILED, vault="default",
                vm_id="vm-1", started_at=5.0, trigger=Trigger.SCHEDULED, slot=4.0,
                disks=("root",), pending_recovery_point_id="rp-1", details={"warnings": ["w"]},
            )
        )  # fmt: skip
        await catalog.insert_item(
            ItemRecord("vm-1", "default", ItemState.PROTECTED, "DefaultPolicy", 1.0)
        )
        await catalog.insert_recovery_point(
            RecoveryPointRecord(
                id="rp-1", vault="default", vm_id="vm-1", job_id="j1", created_at=6.0,
                consistency=Consistency.FILE_SYSTEM, bytes_stored=1,
                disks=(RecoveryPointDiskRecord("root", 10, 4096, 1),),
            )
        )  # fmt: skip
        job = await catalog.job("j1")
        item = await catalog.item("vm-1")
        rp = await catalog.recovery_point("rp-1")
    assert type(job.operation) is Operation
    assert job.operation is Operation.BACKUP
    assert type(job.status) is JobStatus
    assert job.status is JobStatus.FAILED
    assert (job.trigger, job.slot, job.disks) == (Trigger.SCHEDULED, 4.0, ("root",))
    assert (job.pending_recovery_point_id, job.details) == ("rp-1", {"warnings": ["w"]})
    assert item is not None
    assert item.state is ItemState.PROTECTED
    assert item.last_backup_status is None
    assert rp.consistency is Consistency.FILE_SYSTEM
    assert rp.disks[0].consistency is None  # not recorded for this disk
