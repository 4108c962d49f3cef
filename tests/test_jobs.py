"""The job manager across a controller stop: what was committed is kept, the rest fails."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from controller.catalog import Catalog, JobRecord, PolicyRecord, VaultRecord
from controller.datastores import Datastores
from controller.jobs import JobManager
from controller.registry import AgentRegistry
from shared.clock import ManualClock
from shared.digest import chunk_digest
from shared.index import DiskIndex
from shared.manifest import ManifestDisk, RecoveryPointManifest
from shared.policy import default_policy

CHUNK = 4096

DEFAULT_POLICY = PolicyRecord("default", "DefaultPolicy", default_policy().to_dict(), 0.0, 0.0)


async def test_a_backup_committed_just_before_a_stop_is_recorded_and_others_fail(
    tmp_path: Path,
) -> None:
    clock = ManualClock(1_000.0)
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        await catalog.create_vault(VaultRecord("default", "local", CHUNK, 0.0), DEFAULT_POLICY)
        datastores = Datastores(catalog, tmp_path / "datastores")
        store = await datastores.get("default")
        # A backup whose manifest reached the datastore, the controller stopping before the
        # catalog row; and one that had not committed.
        raw = b"x" * CHUNK
        store.put_chunk(chunk_digest(raw), raw, 1, CHUNK)
        index = DiskIndex("root", CHUNK, CHUNK, chunk_digest(raw))
        sha = store.put_index("rp-done", index)
        store.put_manifest(
            RecoveryPointManifest(
                id="rp-done",
                vm_id="vm-1",
                vault="default",
                job_id="job-done",
                created_at=datetime.fromtimestamp(990, UTC),
                consistency="crash",
                disks=(ManifestDisk.of(index, sha),),
            )
        )
        for job_id, rp_id in (("job-done", "rp-done"), ("job-lost", "rp-never")):
            await catalog.insert_job(
                JobRecord(
                    id=job_id, operation="Backup", status="InProgress", vault="default",
                    vm_id="vm-1", started_at=980.0, pending_recovery_point_id=rp_id,
                )
            )  # fmt: skip

        with ThreadPoolExecutor(2) as pool:
            async with JobManager(catalog, AgentRegistry(), datastores, None, clock, pool):
                pass

        done, lost = await catalog.job("job-done"), await catalog.job("job-lost")
        assert (done.status, done.recovery_point_id) == ("Completed", "rp-done")
        assert (lost.status, lost.error_code) == ("Failed", "ControllerRestarted")
        assert [rp.id for rp in await catalog.recovery_points("vm-1")] == ["rp-done"]
