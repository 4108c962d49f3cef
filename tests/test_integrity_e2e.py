"""End to end: damaged chunks in a real datastore, found, reported and healed.

A real controller, real agents and the real CLI; each VM's disk is an image of random data (so
its chunks are stored raw and one chunk file is one 64 KiB block of the disk), and each VM has
a vault of its own (its own region), so the counts of one test are its own. The damage is done
to the datastore's files by hand, as a failing disk or a careless operator would:

- a deleted chunk file: a restore fails with DataCorrupted (exit 7), and the next backup sends
  the chunk again (once, it reported `Completed` with 0 bytes sent and a recovery point that
  could not be restored, and so on for every later backup of the VM);
- a flipped byte: the restore fails naming the recovery point, disk, chunk and digest (once, it
  read "Chunk refused ... Nothing was stored"), and the next backup sends the chunk again;
- 4 bytes overwritten in a chunk four recovery points share, the last taken after the damage:
  all four are marked damaged when one restore meets it, and the next backup heals them all;
- `coffer verify` finding a corrupted and a deleted chunk, per point, on the dashboard too;
- verify of every new recovery point, scheduled by the vault's setting.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller.cli.client import Connection
from shared.rpc import operator_pb2, operator_pb2_grpc
from tests.cluster import Cluster, sha256_file

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CHUNK = 64 << 10
BLOCKS = 32  # a 2 MiB disk


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("integrity")
    with Cluster(root / "cluster", chunk_size=CHUNK) as running:
        yield running


def new_vm(cluster: Cluster, name: str) -> Path:
    """A VM with a 2 MiB disk of random data, protected in a vault of its own (`name`-vault)."""
    image = cluster.root / f"{name}.img"
    image.write_bytes(os.urandom(BLOCKS * CHUNK))
    cluster.add_agent(name, {"root": image}, region=name)
    cluster.coffer("vault", "create", f"{name}-vault", "--region", name)
    cluster.protect(name, f"{name}-vault")
    return image


def change(image: Path, block: int) -> None:
    with image.open("r+b") as disk:
        disk.seek(block * CHUNK)
        disk.write(os.urandom(CHUNK))


def chunk_file(cluster: Cluster, name: str, image: Path, block: int) -> Path:
    """The datastore file of the chunk at `block` of the disk as it is now."""
    # Named by the vault's keyed hash (every new vault is encrypted), as the agent names it.
    chunk_hash = cluster.open_datastore(f"{name}-vault").chunk_hash
    with image.open("rb") as disk:
        disk.seek(block * CHUNK)
        hexed = chunk_hash.digest(disk.read(CHUNK)).hex()
    return cluster.datastore(f"{name}-vault") / "chunks" / hexed[:2] / hexed[2:4] / hexed


def damage(path: Path, offset: int, length: int) -> None:
    """Overwrite `length` bytes of a file at `offset` with other bytes."""
    blob = bytearray(path.read_bytes())
    blob[offset : offset + length] = bytes(b ^ 0xFF for b in blob[offset : offset + length])
    path.write_bytes(bytes(blob))


def backup(cluster: Cluster, name: str) -> dict[str, Any]:
    job: dict[str, Any] = cluster.coffer("backup-now", name)
    assert job["status"] == "Completed", job
    return job


def points(cluster: Cluster, name: str) -> dict[str, dict[str, Any]]:
    return {p["id"]: p for p in cluster.coffer("rp", "list", name)}


def wait_for(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise TimeoutError(what)


def all_verified(cluster: Cluster, name: str, rp_ids: list[str]) -> None:
    def check() -> bool:
        listed = points(cluster, name)
        return all(listed[rp]["verification"] == "verified" for rp in rp_ids)

    wait_for(check, f"{rp_ids} verified: {points(cluster, name)}")


def restore_matches(cluster: Cluster, name: str, rp: str, sha: str) -> None:
    target = cluster.agents[name].restore_dir / f"{rp}.img"
    job = cluster.restore(name, rp, "root", target)
    assert job["status"] == "Completed", job
    assert sha256_file(target) == sha
    target.unlink()


def failed_restore(cluster: Cluster, name: str, rp: str) -> tuple[dict[str, Any], str]:
    target = cluster.agents[name].restore_dir / f"{rp}-damaged.img"
    result = cluster.coffer(
        "restore", name, "--rp", rp, "--disk", "root", "--target", str(target), check=False,
        json_out=False,
    )  # fmt: skip
    assert result.returncode == 7, (result.stdout, result.stderr)
    assert not target.exists()
    job = cluster.coffer("job", "list", "--operation", "Restore", "--vm", name, "--limit", "1")[0]
    return job, result.stdout


def test_a_deleted_chunk_fails_the_restore_and_the_next_backup_sends_it_again(
    cluster: Cluster,
) -> None:
    image = new_vm(cluster, "del-1")
    first = backup(cluster, "del-1")
    sha = sha256_file(image)
    victim = chunk_file(cluster, "del-1", image, 5)
    victim.unlink()

    # The controller cannot find it: damage, not "not found".
    job, shown = failed_restore(cluster, "del-1", first["recovery_point_id"])
    assert job["error_code"] == "DataCorrupted", job
    message = job["error_message"]
    for words in (first["recovery_point_id"], "'root'", "chunk 5 ", victim.name, "missing",
                  "coffer verify"):  # fmt: skip
        assert words in message, message
    assert "DataCorrupted" in shown
    assert points(cluster, "del-1")[first["recovery_point_id"]]["verification"] == "damaged"

    second = backup(cluster, "del-1")
    assert int(second["bytes_sent"]) >= CHUNK, second  # it was 0: the chunk taken on trust
    assert victim.exists()
    restore_matches(cluster, "del-1", second["recovery_point_id"], sha)
    # The first point healed, and the verify the backup's end started says it is whole.
    all_verified(cluster, "del-1", [first["recovery_point_id"]])
    restore_matches(cluster, "del-1", first["recovery_point_id"], sha)


def test_a_chunk_deleted_unnoticed_is_sent_again_by_the_next_backup(cluster: Cluster) -> None:
    """No restore or verify in between: the backup itself finds its base's chunk missing."""
    image = new_vm(cluster, "gone-1")
    first = backup(cluster, "gone-1")
    sha = sha256_file(image)
    chunk_file(cluster, "gone-1", image, 9).unlink()
    second = backup(cluster, "gone-1")
    assert int(second["bytes_sent"]) >= CHUNK, second
    restore_matches(cluster, "gone-1", second["recovery_point_id"], sha)
    all_verified(cluster, "gone-1", [first["recovery_point_id"]])


def test_a_flipped_byte_fails_the_restore_with_exit_7_and_the_next_backup_heals_it(
    cluster: Cluster,
) -> None:
    image = new_vm(cluster, "flip-1")
    first = backup(cluster, "flip-1")
    sha = sha256_file(image)
    victim = chunk_file(cluster, "flip-1", image, 7)
    damage(victim, 1000, 1)  # one byte of the payload: the agent's check finds it

    job, _ = failed_restore(cluster, "flip-1", first["recovery_point_id"])
    assert job["error_code"] == "DataCorrupted", job
    message = job["error_message"]
    for words in (first["recovery_point_id"], "'root'", "chunk 7 ", victim.name, "verify"):
        assert words in message, message
    assert "Chunk refused" not in message
    assert "Nothing was stored" not in message
    listed = points(cluster, "flip-1")[first["recovery_point_id"]]
    assert listed["verification"] == "damaged"
    assert listed["damaged_chunks"] == 1
    assert int(listed["damage"][0]["chunk"]) == 7
    assert listed["damage"][0]["digest"] == victim.name

    second = backup(cluster, "flip-1")
    assert int(second["bytes_sent"]) >= CHUNK, second
    restore_matches(cluster, "flip-1", second["recovery_point_id"], sha)
    all_verified(cluster, "flip-1", [first["recovery_point_id"]])
    restore_matches(cluster, "flip-1", first["recovery_point_id"], sha)


def test_four_points_sharing_a_damaged_chunk_are_all_marked_and_all_heal(
    cluster: Cluster,
) -> None:
    image = new_vm(cluster, "four-1")
    taken: list[tuple[str, str]] = []
    for block in (None, 10, 11):
        if block is not None:
            change(image, block)
        taken.append((backup(cluster, "four-1")["recovery_point_id"], sha256_file(image)))
    shared = chunk_file(cluster, "four-1", image, 0)  # in every point
    damage(shared, 5000, 4)  # 4 bytes overwritten
    change(image, 12)
    # Taken after the damage, it deduplicates against the damaged chunk: nothing reads it.
    after = backup(cluster, "four-1")
    taken.append((after["recovery_point_id"], sha256_file(image)))

    job, _ = failed_restore(cluster, "four-1", after["recovery_point_id"])
    assert job["error_code"] == "DataCorrupted"
    assert "chunk 0 " in job["error_message"]
    listed = points(cluster, "four-1")
    assert {rp: listed[rp]["verification"] for rp, _ in taken} == {rp: "damaged" for rp, _ in taken}
    board = cluster.coffer("dashboard", "--vault", "four-1-vault")
    assert (board["recovery_points_damaged"], board["bad_chunks"]) == (4, 1)

    fifth = backup(cluster, "four-1")
    assert int(fifth["bytes_sent"]) >= CHUNK, fifth
    taken.append((fifth["recovery_point_id"], sha256_file(image)))
    all_verified(cluster, "four-1", [rp for rp, _ in taken[:4]])
    for rp, sha in taken:
        restore_matches(cluster, "four-1", rp, sha)
    board = cluster.coffer("dashboard", "--vault", "four-1-vault")
    assert (board["recovery_points_damaged"], board["bad_chunks"]) == (0, 0)


def test_verify_finds_a_corrupted_and_a_deleted_chunk_and_a_backup_heals_them(
    cluster: Cluster,
) -> None:
    image = new_vm(cluster, "ver-1")
    first = backup(cluster, "ver-1")["recovery_point_id"]
    sha_first = sha256_file(image)
    change(image, 20)
    second = backup(cluster, "ver-1")["recovery_point_id"]
    sha_second = sha256_file(image)
    board = cluster.coffer("dashboard", "--vault", "ver-1-vault")
    assert (board["recovery_points_never_verified"], board["recovery_points_verified"]) == (2, 0)

    verified = cluster.coffer("verify", "--vault", "ver-1-vault")
    assert verified["status"] == "Completed", verified
    assert verified["details"]["verification"]["chunks_checked"] == BLOCKS + 1
    all_verified(cluster, "ver-1", [first, second])

    corrupted = chunk_file(cluster, "ver-1", image, 3)  # in both points
    damage(corrupted, 2000, 1)
    deleted = chunk_file(cluster, "ver-1", image, 20)  # in the second only
    deleted.unlink()
    result = cluster.coffer("verify", "--vault", "ver-1-vault", check=False)
    assert result["status"] == "Failed"
    assert result["error_code"] == "RecoveryPointsDamaged"
    assert "2 of 2 recovery points damaged" in result["error_message"]
    exit_code = cluster.coffer("verify", "--vault", "ver-1-vault", "--rp", first,
                               json_out=False, check=False).returncode  # fmt: skip
    assert exit_code == 7

    listed = points(cluster, "ver-1")
    assert listed[first]["verification"] == "damaged"
    assert [(int(d["chunk"]), d["digest"]) for d in listed[first]["damage"]] == [
        (3, corrupted.name)
    ]
    assert listed[second]["damaged_chunks"] == 2
    assert {d["digest"]: d["reason"] for d in listed[second]["damage"]}[deleted.name] == "missing"
    table = cluster.coffer("rp", "list", "ver-1", json_out=False).stdout
    assert "damaged:" in table
    board = cluster.coffer("dashboard", "--vault", "ver-1-vault")
    assert (board["recovery_points_damaged"], board["recovery_points_verified"]) == (2, 0)
    assert board["bad_chunks"] == 2
    assert "Integrity" in cluster.coffer("dashboard", "--vault", "ver-1-vault",
                                         json_out=False).stdout  # fmt: skip

    # The next backup holds both chunks' data (the disk has not changed since the second
    # point) and sends them again; the points heal and the verify after it says so.
    third = backup(cluster, "ver-1")
    assert int(third["bytes_sent"]) >= 2 * CHUNK, third
    all_verified(cluster, "ver-1", [first, second])
    board = cluster.coffer("dashboard", "--vault", "ver-1-vault")
    assert board["recovery_points_damaged"] == 0
    assert board["recovery_points_verified"] == 2
    assert board["recovery_points_never_verified"] == 1  # the third: its vault verifies no new
    assert board["bad_chunks"] == 0
    restore_matches(cluster, "ver-1", first, sha_first)
    restore_matches(cluster, "ver-1", second, sha_second)


def test_the_vault_setting_verifies_every_new_recovery_point(cluster: Cluster) -> None:
    new_vm(cluster, "sched-1")
    updated = cluster.coffer(
        "vault", "update", "sched-1-vault", "--verify-new", "on", "--reverify-days", "7"
    )
    assert (updated["verify_new"], updated["reverify_days"]) == (True, 7)
    job = backup(cluster, "sched-1")

    def verify_job() -> dict[str, Any] | None:
        listed = cluster.coffer("job", "list", "--operation", "Verify", "--vault", "sched-1-vault")
        ended = [j for j in listed if j["status"] != "InProgress"]
        return ended[0] if ended else None

    after = wait_for(verify_job, "a Verify job after the backup")
    assert after["status"] == "Completed", after
    assert after["trigger"] == "scheduled"
    assert after["details"]["after_job"] == job["id"]
    assert points(cluster, "sched-1")[job["recovery_point_id"]]["verification"] == "verified"
    shown = cluster.coffer("vault", "show", "sched-1-vault", json_out=False).stdout
    assert "new points, every 7 days" in shown

    # Nothing to change, or out of range: refused by the CLI and by the API alike.
    for args in ((), ("--reverify-days", "5000"), ("--verify-new", "maybe")):
        result = cluster.coffer("vault", "update", "sched-1-vault", *args, json_out=False,
                                check=False)  # fmt: skip
        assert result.returncode == 2, (args, result.stderr)
    with Connection(f"127.0.0.1:{cluster.port}", cluster.pki).channel() as channel:
        stub = operator_pb2_grpc.OperatorServiceStub(channel)
        for request in (
            operator_pb2.UpdateVaultRequest(name="sched-1-vault"),
            operator_pb2.UpdateVaultRequest(name="sched-1-vault", reverify_days=5000),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                stub.UpdateVault(request)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert cluster.coffer("vault", "show", "sched-1-vault")["reverify_days"] == 7
    cluster.coffer("vault", "update", "sched-1-vault", "--verify-new", "off")
    assert cluster.coffer("vault", "show", "sched-1-vault")["verify_new"] is False
