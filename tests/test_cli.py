"""The `coffer` CLI as operators and scripts meet it, against a real controller.

What it promises: numbers are checked (by the CLI and again by the API), an unknown vault is an
error wherever one is named, exit codes follow one documented table, job ids can be shortened,
times carry their offset, job details read as fields, `pki issue-*` does not silently replace a
key, fix hints name real vaults, and no call waits forever on a controller that never answers.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner

from controller.cli.client import Connection
from controller.cli.exits import EXIT_CODES
from controller.cli.main import cli
from shared.errors import CofferError
from shared.rpc import operator_pb2, operator_pb2_grpc
from tests.cluster import BIN, Cluster

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


# --- the exit code table -----------------------------------------------------------------------


def readme_exit_codes() -> dict[int, tuple[str, set[str]]]:
    """README.md's exit code table: exit code → (meaning, the error codes listed)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[int, tuple[str, set[str]]] = {}
    for line in section.splitlines():
        match = re.fullmatch(r"\| (\d+) \| ([^|]+) \|([^|]*)\|", line)
        if match:
            codes = set(re.findall(r"`([A-Za-z]+)`", match[3]))
            rows[int(match[1])] = (match[2].strip(), codes)
    return rows


def test_every_error_code_exits_as_the_readme_table_says() -> None:
    table = readme_exit_codes()
    assert {code: meaning for code, (meaning, _) in table.items()} == EXIT_CODES
    listed = {error: code for code, (_, errors) in table.items() for error in errors}
    registered = CofferError.registered()
    for error, cls in registered.items():
        assert error in listed, f"{error} is missing from README.md's exit code table"
        assert listed[error] == cls.exit_code, (
            f"{error} exits {cls.exit_code}, but README.md lists it under {listed[error]}"
        )
    assert set(listed) <= set(registered), set(listed) - set(registered)
    # `coffer --help` tells the same codes.
    helped = CliRunner().invoke(cli, ["--help"], terminal_width=120).output
    for code, meaning in EXIT_CODES.items():
        assert re.search(rf"^\s+{code}  {re.escape(meaning)}$", helped, re.MULTILINE), helped


# --- a controller with one agent ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cli")
    disk = root / "disk.img"
    disk.write_bytes(os.urandom(4 * MiB))
    with Cluster(root / "cluster") as running:
        running.add_agent("app-1", {"root": disk}, service="shop", region="north")
        running.coffer("vault", "create", "north-vault", "--region", "north")
        yield running


def run(
    cluster: Cluster, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "coffer"), "--controller", f"127.0.0.1:{cluster.port}"]
    argv += ["--tls-dir", str(cluster.pki), *args]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def refused(cluster: Cluster, *args: str, code: int, says: tuple[str, ...] = ()) -> str:
    result = run(cluster, *args)
    assert result.returncode == code, (args, result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for words in says:
        assert words in result.stderr, (args, result.stderr)
    return result.stderr


@pytest.fixture(scope="module")
def stub(cluster: Cluster) -> Iterator[operator_pb2_grpc.OperatorServiceStub]:
    """The operator API itself, as another client than the CLI would call it."""
    with Connection(f"127.0.0.1:{cluster.port}", cluster.pki).channel() as channel:
        yield operator_pb2_grpc.OperatorServiceStub(channel)


def rpc_status(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    code: grpc.StatusCode = caught.value.code()
    return code


def test_numbers_are_checked_by_the_cli_and_by_the_api(
    cluster: Cluster, stub: operator_pb2_grpc.OperatorServiceStub
) -> None:
    for value in ("0", "-1", "10001", "x"):
        refused(cluster, "vault", "update", "north-vault", "--max-concurrent-backups", value,
                code=2, says=("--max-concurrent-backups",))  # fmt: skip
    refused(cluster, "vault", "create", "v2", "--region", "north",
            "--max-concurrent-backups", "0", code=2)  # fmt: skip
    refused(cluster, "job", "list", "--limit", "0", code=2)
    refused(cluster, "job", "list", "--limit", "-5", code=2)
    refused(cluster, "dashboard", "--vault", "north-vault", "--watch", "-1", code=2)
    refused(cluster, "--timeout", "0", "vault", "list", code=2)
    assert [v["name"] for v in cluster.coffer("vault", "list")] == ["north-vault"]
    assert cluster.coffer("vault", "show", "north-vault")["max_concurrent_backups"] == 4

    # The API checks what the CLI checks: the CLI is not its only client.
    for bad in (0, 10_001, 1 << 31):
        request = operator_pb2.UpdateVaultRequest(name="north-vault", max_concurrent_backups=bad)
        assert rpc_status(lambda r=request: stub.UpdateVault(r)) == grpc.StatusCode.INVALID_ARGUMENT
    too_many = operator_pb2.ListJobsRequest(limit=1_000_000)
    assert rpc_status(lambda: stub.ListJobs(too_many)) == grpc.StatusCode.INVALID_ARGUMENT
    assert cluster.coffer("vault", "show", "north-vault")["max_concurrent_backups"] == 4
    # The operator's choice, well above the old cap of 64, up to 10,000.
    updated = cluster.coffer("vault", "update", "north-vault", "--max-concurrent-backups", "5000")
    assert updated["max_concurrent_backups"] == 5000
    updated = cluster.coffer("vault", "update", "north-vault", "--max-concurrent-backups", "2")
    assert updated["max_concurrent_backups"] == 2


def test_an_unknown_vault_is_an_error_wherever_one_is_named(
    cluster: Cluster, stub: operator_pb2_grpc.OperatorServiceStub
) -> None:
    commands = [
        ("job", "list", "--vault", "nope"),
        ("rp", "list", "--vault", "nope"),
        ("items", "--vault", "nope"),
        ("discover", "--vault", "nope"),
        ("register", "--vault", "nope", "app-1"),
        ("unregister", "--vault", "nope", "app-1"),
        ("protect", "--vault", "nope", "app-1"),
        ("stop-protection", "--vault", "nope", "app-1", "--retain-data"),
        ("resume-protection", "--vault", "nope", "app-1"),
        ("backup-now", "--vault", "nope", "app-1"),
        ("policy", "list", "--vault", "nope"),
        ("policy", "show", "--vault", "nope", "DefaultPolicy"),
        ("policy", "create", "--vault", "nope", "Gold", "--daily", "7"),
        ("policy", "edit", "--vault", "nope", "DefaultPolicy", "--daily", "3"),
        ("policy", "delete", "--vault", "nope", "DefaultPolicy"),
        ("dashboard", "--vault", "nope"),
        ("prune", "--vault", "nope"),
        ("gc", "--vault", "nope"),
        ("vault", "show", "nope"),
        ("vault", "update", "nope", "--max-concurrent-backups", "2"),
        ("vault", "delete", "nope"),
    ]
    for command in commands:
        refused(cluster, *command, code=4, says=("vault 'nope'",))
    for call in (
        lambda: stub.ListJobs(operator_pb2.ListJobsRequest(vault="nope")),
        lambda: stub.ListRecoveryPoints(operator_pb2.ListRecoveryPointsRequest(vault="nope")),
        lambda: stub.GetPolicy(operator_pb2.PolicyRef(vault="nope", name="DefaultPolicy")),
    ):
        assert rpc_status(call) == grpc.StatusCode.NOT_FOUND


def test_fix_hints_name_real_vaults(cluster: Cluster) -> None:
    # Not registered to any vault: the hint names the vault of its region, not "any vault".
    said = refused(cluster, "backup-now", "app-1", code=4, says=("not registered to any vault",))
    assert "coffer register --vault north-vault shop/app-1" in " ".join(said.split())
    assert "--vault any vault" not in said
    cluster.coffer("vault", "create", "other-vault", "--region", "north")
    cluster.coffer("register", "--vault", "north-vault", "app-1")
    # Registered to another vault than the one named: it says which.
    said = refused(cluster, "protect", "--vault", "other-vault", "app-1", code=4)
    assert "registered to vault 'north-vault'" in " ".join(said.split())
    cluster.coffer("vault", "delete", "other-vault")


def item(cluster: Cluster, vm_id: str) -> tuple[str, str]:
    """(state, policy) of a VM in north-vault."""
    found = {i["vm_id"]: i for i in cluster.coffer("items", "--vault", "north-vault")}[vm_id]
    return found["state"], found["policy"]


def ensure_registered(cluster: Cluster) -> None:
    if "app-1" not in {i["vm_id"] for i in cluster.coffer("items", "--vault", "north-vault")}:
        cluster.coffer("register", "--vault", "north-vault", "app-1")


def test_resume_protection_keeps_the_policy_the_vm_had(cluster: Cluster) -> None:
    ensure_registered(cluster)
    cluster.coffer(
        "protect", "--vault", "north-vault", "app-1", "--new-policy", "Gold",
        "--schedule", "daily 03:00", "--daily", "7", "--weekly", "sun:8",
    )  # fmt: skip
    cluster.coffer("stop-protection", "--vault", "north-vault", "app-1", "--retain-data")
    assert item(cluster, "app-1") == ("ProtectionStopped", "Gold")
    cluster.coffer("resume-protection", "--vault", "north-vault", "app-1")
    assert item(cluster, "app-1") == ("Protected (pending initial backup)", "Gold")
    # Named, another policy is taken.
    cluster.coffer("stop-protection", "--vault", "north-vault", "app-1", "--retain-data")
    cluster.coffer("resume-protection", "--vault", "north-vault", "app-1", "--policy",
                   "DefaultPolicy")  # fmt: skip
    assert item(cluster, "app-1") == ("Protected (pending initial backup)", "DefaultPolicy")
    cluster.coffer("stop-protection", "--vault", "north-vault", "app-1", "--delete-data", "--yes")
    assert item(cluster, "app-1") == ("Registered", "")


def test_a_failed_job_exits_with_its_errors_exit_code(cluster: Cluster) -> None:
    ensure_registered(cluster)
    cluster.coffer("protect", "--vault", "north-vault", "--policy", "DefaultPolicy", "app-1")
    backup = cluster.coffer("backup-now", "app-1")
    assert backup["status"] == "Completed", backup
    # Shown as fields, the consistency of each disk included: no Python dict.
    shown = run(cluster, "job", "show", backup["id"]).stdout
    assert re.search(r"^Recovery point\s+" + backup["recovery_point_id"], shown, re.MULTILINE)
    assert re.search(r"^Consistency\s*$", shown, re.MULTILINE), shown
    assert re.search(r"^  root\s+\S", shown, re.MULTILINE), shown
    assert "{" not in shown
    rp = backup["recovery_point_id"]

    # Refused by the agent's restore_dirs: not allowed, 6 (not "the job failed", 3).
    outside = run(cluster, "restore", "app-1", "--rp", rp, "--disk", "root", "--target",
                  "/etc/coffer-cli-test.img", "--json")  # fmt: skip
    assert outside.returncode == 6, outside.stderr
    assert '"UserErrorRestorePathNotAllowed"' in outside.stdout
    assert not Path("/etc/coffer-cli-test.img").exists()

    # A chunk whose bytes are not what its name says: data integrity, 7.
    chunks = sorted(
        p for p in (cluster.datastore("north-vault") / "chunks").rglob("*") if p.is_file()
    )
    assert len(chunks) >= 2
    victim, other = chunks[0], chunks[1]
    kept = victim.read_bytes()
    victim.write_bytes(other.read_bytes())
    try:
        target = cluster.agents["app-1"].restore_dir / "corrupt.img"
        corrupt = run(cluster, "restore", "app-1", "--rp", rp, "--disk", "root",
                      "--target", str(target))  # fmt: skip
        assert corrupt.returncode == 7, (corrupt.stdout, corrupt.stderr)
        # The agent's check names the damaged chunk (DataCorrupted, with the fix).
        assert "DataCorrupted" in corrupt.stdout, corrupt.stdout
        assert not target.exists()
    finally:
        victim.write_bytes(kept)
    cluster.coffer("stop-protection", "--vault", "north-vault", "app-1", "--delete-data", "--yes")


def insert_job(cluster: Cluster, job_id: str) -> None:
    """A job row under an id the test chooses: ids are random, and two sharing a prefix are
    needed. Written into the controller's live catalog like any other writer would."""
    with sqlite3.connect(cluster.root / "state" / "catalog.sqlite") as db:
        db.execute(
            "INSERT INTO jobs (id, operation, status, vault, vm_id, started_at, ended_at)"
            " VALUES (?, 'Discovery', 'Completed', 'north-vault', '', ?, ?)",
            (job_id, time.time(), time.time()),
        )


def test_job_ids_can_be_shortened_to_a_unique_prefix(
    cluster: Cluster, stub: operator_pb2_grpc.OperatorServiceStub
) -> None:
    job = cluster.coffer("discover", "--vault", "north-vault")["job"]
    ids = [j["id"] for j in cluster.coffer("job", "list", "--limit", "10000")]
    prefix = next(
        job["id"][:n] for n in range(4, 13) if sum(i.startswith(job["id"][:n]) for i in ids) == 1
    )
    assert cluster.coffer("job", "show", prefix)["id"] == job["id"]
    assert cluster.coffer("job", "watch", prefix)["id"] == job["id"]
    refused(cluster, "job", "cancel", prefix, code=5, says=(f"job {job['id']} has already ended",))
    reply = stub.GetJob(operator_pb2.GetJobRequest(id=prefix))
    assert reply.id == job["id"]
    refused(cluster, "job", "show", job["id"][:3], code=2, says=("at least 4 characters",))

    insert_job(cluster, "c0ffee100000")
    insert_job(cluster, "c0ffee200000")
    for command in ("show", "watch", "cancel"):
        refused(cluster, "job", command, "c0ff", code=2,
                says=("AmbiguousJobId", "c0ffee100000", "c0ffee200000"))  # fmt: skip
    assert cluster.coffer("job", "show", "c0ffee2")["id"] == "c0ffee200000"
    assert cluster.coffer("job", "show", "c0ffee100000")["id"] == "c0ffee100000"
    stream = stub.WatchJob(operator_pb2.GetJobRequest(id="c0ffee"))
    assert rpc_status(lambda: next(stream)) == grpc.StatusCode.INVALID_ARGUMENT
    refused(cluster, "job", "show", "ffffffff", code=4, says=("'ffffffff'",))


def test_times_are_iso_8601_with_their_offset(cluster: Cluster) -> None:
    cluster.coffer("discover", "--vault", "north-vault")
    india = {"TZ": "Asia/Kolkata"}
    table = run(cluster, "job", "list", "--limit", "1", env=india).stdout
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+05:30", table), table
    (latest,) = run_json(cluster, "job", "list", "--limit", "1", env=india)
    started = datetime.fromisoformat(latest["started_at"])
    assert started.utcoffset() == timedelta(hours=5, minutes=30)
    (in_utc,) = run_json(cluster, "--utc", "job", "list", "--limit", "1", env=india)
    assert in_utc["started_at"].endswith("+00:00")
    assert datetime.fromisoformat(in_utc["started_at"]) == started
    utc_table = run(cluster, "--utc", "job", "list", "--limit", "1", env=india).stdout
    assert "+00:00" in utc_table
    assert "+05:30" not in utc_table
    # A time without an offset is read in the zone shown: an hour before the job started, as
    # a local time in India, finds it; the same wall time read as UTC is 5.5 hours later.
    before = (started - timedelta(hours=1)).replace(tzinfo=None).isoformat(timespec="seconds")
    found = run_json(cluster, "job", "list", "--from", before, env=india)
    assert latest["id"] in {j["id"] for j in found}
    later = run_json(cluster, "--utc", "job", "list", "--from", before, env=india)
    assert latest["id"] not in {j["id"] for j in later}


def run_json(cluster: Cluster, *args: str, env: dict[str, str] | None = None) -> Any:
    result = run(cluster, *args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_job_details_read_as_labelled_fields(cluster: Cluster) -> None:
    collected = run(cluster, "gc", "--vault", "north-vault")
    assert collected.returncode == 0, collected.stderr
    text = collected.stdout
    for label in ("Chunks deleted", "Space freed", "Chunks referenced", "Grace period"):
        assert re.search(rf"^\s*{label}\s+\S", text, re.MULTILINE), text
    assert "{" not in text
    assert "'" not in text
    job = run_json(cluster, "job", "list", "--operation", "GarbageCollection", "--limit", "1")[0]
    assert isinstance(job["details"]["report"], dict)
    assert job["details"]["report"]["chunks_deleted"] == 0
    assert "details_json" not in job
    discovery = cluster.coffer("discover", "--vault", "north-vault")["job"]
    shown = run(cluster, "job", "show", discovery["id"]).stdout
    assert re.search(r"^VMs discovered\s+", shown, re.MULTILINE), shown
    assert "[" not in shown


def pki(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "coffer"), "pki", *args], capture_output=True, text=True)


def test_pki_does_not_replace_a_bundle_without_force(cluster: Cluster, tmp_path: Path) -> None:
    ca = str(cluster.pki)
    running = cluster.root / "tls-app-1"  # the running agent's bundle
    admin = cluster.pki  # `pki init` put operator admin's bundle beside the CA
    foreign = tmp_path / "foreign"  # a bundle of another CA
    foreign.mkdir()
    (foreign / "ca.crt").write_text("another CA\n")
    before = {
        p: p.read_bytes() for d in (running, admin, foreign) for p in d.iterdir() if p.is_file()
    }
    for args in (
        ("issue-agent", "app-1", "--out", str(running)),
        ("issue-operator", "bob", "--out", str(admin)),
        ("issue-agent", "app-2", "--out", str(foreign)),
    ):
        result = pki(*args, "--dir", ca)
        assert result.returncode == 5, (args, result.stderr)
        assert "--force" in result.stderr
    assert {p: p.read_bytes() for p in before} == before
    assert cluster.coffer("agents")[0]["online"]

    # Asked for, it is replaced.
    spare = tmp_path / "spare"
    assert pki("issue-agent", "app-1", "--dir", ca, "--out", str(spare)).returncode == 0
    key = (spare / "agent.key").read_bytes()
    assert pki("issue-agent", "app-1", "--dir", ca, "--out", str(spare)).returncode == 5
    assert pki("issue-agent", "app-1", "--dir", ca, "--out", str(spare), "--force").returncode == 0
    assert (spare / "agent.key").read_bytes() != key


# --- a controller that never answers ------------------------------------------------------------


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """A real listener on loopback that accepts TCP connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


@pytest.mark.parametrize(
    "command",
    [("vault", "list"), ("job", "watch", "c0ffee"), ("--timeout", "1.5", "job", "list", "--json")],
)
def test_a_controller_that_never_answers_is_unreachable_not_a_hang(
    cluster: Cluster, silent_listener: str, command: tuple[str, ...]
) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "coffer"), "--controller", silent_listener, "--tls-dir", str(cluster.pki),
         *command],
        capture_output=True, text=True, timeout=90,
        env={**os.environ, "COFFER_TIMEOUT": "1.5"},  # as `--timeout 1.5`
    )  # fmt: skip
    took = time.monotonic() - started
    assert result.returncode == 8, (result.returncode, result.stderr)
    assert silent_listener in result.stderr
    assert "did not answer within 1.5 s" in " ".join(result.stderr.split())
    assert took < 10, took
