"""Values an operator (or any API client) gives that the record cannot hold, and calls that must
apply all or nothing (issue 14, "Values that break the record").

A real controller, a real agent and, as the restore target that keeps a restore running, an
agent played on the generated stubs (tests/hostile_agent.py). Each case refused with a typed
error and nothing changed: `--from 0001-01-01`, a NUL byte in a restore target, a deeply nested
policy JSON, `--schedule ''`, and `stop-protection --delete-data` while a restore reads the
VM's recovery points.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from controller.cli.client import Connection
from shared.rpc import operator_pb2, operator_pb2_grpc
from tests.cluster import Cluster
from tests.hostile_agent import HostileAgent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("ranges")
    disk = root / "disk.img"
    disk.write_bytes(os.urandom(2 * MiB))
    with Cluster(root / "cluster") as running:
        running.add_agent("src-1", {"root": disk}, region="lab")
        yield running


@pytest.fixture(scope="module")
def stub(cluster: Cluster) -> Iterator[operator_pb2_grpc.OperatorServiceStub]:
    with Connection(f"127.0.0.1:{cluster.port}", cluster.pki).channel() as channel:
        yield operator_pb2_grpc.OperatorServiceStub(channel)


def _refused(cluster: Cluster, *args: str) -> str:
    result = cluster.coffer(*args, json_out=False, check=False)
    assert result.returncode == 2, (args, result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return str(result.stderr)


def _rpc_error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_times_before_year_one_are_refused_typed(cluster: Cluster) -> None:
    for args in (
        ("job", "list", "--from", "0001-01-01"),
        ("job", "list", "--to", "0001-01-01T00:00+01:00"),
        ("audit", "list", "--from", "0001-01-01"),
    ):
        assert "InvalidArgument" in _refused(cluster, *args)


def test_an_empty_schedule_is_refused_not_made_daily(cluster: Cluster) -> None:
    cluster.coffer("vault", "create", "lab", "--region", "lab")
    said = _refused(
        cluster, "policy", "create", "--vault", "lab", "Empty", "--schedule", "", "--daily", "7"
    )
    assert "InvalidPolicy" in said
    assert "must start with daily or weekly" in said
    assert "Empty" not in {p["name"] for p in cluster.coffer("policy", "list", "--vault", "lab")}


def test_deeply_nested_policy_json_is_refused_typed(
    cluster: Cluster, stub: operator_pb2_grpc.OperatorServiceStub
) -> None:
    if "lab" not in {v["name"] for v in cluster.coffer("vault", "list")}:
        cluster.coffer("vault", "create", "lab", "--region", "lab")
    deep = "[" * 5000 + "]" * 5000
    for spec in (deep, '{"name": "Deep", "schedule": ' + deep + "}", "1" * 5000):
        error = _rpc_error(
            lambda spec=spec: stub.CreatePolicy(
                operator_pb2.PolicyRequest(vault="lab", spec_json=spec)
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert "InvalidPolicy" in str(error.trailing_metadata())
    # The controller goes on serving.
    assert cluster.coffer("policy", "list", "--vault", "lab") is not None


def _backed_up(cluster: Cluster) -> str:
    job = cluster.backup("src-1")
    assert job["status"] == "Completed", job
    return str(job["recovery_point_id"])


def _jobs(cluster: Cluster) -> int:
    with sqlite3.connect(cluster.root / "state" / "catalog.sqlite") as db:
        return int(db.execute("SELECT count(*) FROM jobs").fetchone()[0])


def test_a_nul_byte_in_a_restore_target_is_refused_and_starts_nothing(
    cluster: Cluster, stub: operator_pb2_grpc.OperatorServiceStub
) -> None:
    rp = _backed_up(cluster)
    before = _jobs(cluster)
    target = str(cluster.agents["src-1"].restore_dir / "a\0b.img")
    for path in (target, "/" + "p" * 5000):
        error = _rpc_error(
            lambda path=path: stub.Restore(
                operator_pb2.RestoreRequest(
                    vm_id="src-1", recovery_point_id=rp, disk="root", target_path=path
                )
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert "NUL byte" in (error.details() or "")
    assert _jobs(cluster) == before
    assert not list(Path(cluster.agents["src-1"].restore_dir).iterdir())


async def test_delete_data_refused_for_a_running_restore_changes_nothing(
    cluster: Cluster,
) -> None:
    """`stop-protection --delete-data`, refused because a restore reads the VM's recovery
    points, still stopped its protection."""
    rp = await asyncio.to_thread(_backed_up, cluster)
    async with HostileAgent(cluster, "restore-target-1") as target:
        await target.accepted()
        job = await asyncio.to_thread(
            cluster.coffer, "restore", "src-1", "--rp", rp, "--disk", "root",
            "--target", "/restore/x.img", "--target-vm", "restore-target-1", "--no-wait",
        )  # fmt: skip
        command = await asyncio.wait_for(target.session.read(), 20)
        assert command.HasField("restore"), command  # the restore runs: it never answers
        result = await asyncio.to_thread(
            cluster.coffer, "stop-protection", "--vault", "lab", "src-1", "--delete-data",
            "--yes", json_out=False, check=False,
        )  # fmt: skip
        assert result.returncode == 5, (result.stdout, result.stderr)
        assert "being read by a running job" in result.stderr
        items = {i["vm_id"]: i for i in cluster.coffer("items", "--vault", "lab")}
        assert items["src-1"]["state"].startswith("Protected"), items["src-1"]
        points = await asyncio.to_thread(cluster.coffer, "rp", "list", "src-1")
        assert rp in {p["id"] for p in points}
        await asyncio.to_thread(cluster.coffer, "job", "cancel", job["id"], check=False)
