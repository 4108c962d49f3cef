"""The controller's configuration file (TOML): its schema, its defaults, what it becomes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field

from shared.config import Host, ListenAddress, NonEmpty, Port, Section, load
from shared.tls import TlsFiles

# Chosen with the benchmark (tests/bench, table in the foundation issue's closing note): on a
# 2 GiB ext4 image, 512 KiB chunks add a quarter fewer bytes than 1 MiB for file-level edits
# (72.5 against 97.7 MiB, restic 76.6) and still back up and restore faster than borg and
# restic; 256 KiB adds less again but cost 60% more time per full backup.
DEFAULT_CHUNK_SIZE = 512 << 10
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 16 << 20
# Longer than any backup takes between uploading a chunk and committing its recovery point.
DEFAULT_GC_GRACE_SECONDS = 6 * 3600.0
# Certificates the controller issues (enrolment, renewal, its own) live this long; agents and
# the controller renew theirs after 2/3 of it.
DEFAULT_CERTIFICATE_DAYS = 90.0
MAX_CERTIFICATE_DAYS = 3650.0


@dataclass(frozen=True)
class MqttBroker:
    host: str
    port: int


@dataclass(frozen=True)
class ControllerConfig:
    listen: str
    state_dir: Path
    pki_dir: Path
    chunk_size: int = DEFAULT_CHUNK_SIZE
    # None: the controller starts its own private Mosquitto.
    mqtt: MqttBroker | None = None
    # Address agents are told to reach the private broker on (defaults to the listen host).
    advertise_host: str | None = None
    # Garbage collection never deletes chunks written less than this long ago.
    gc_grace_seconds: float = DEFAULT_GC_GRACE_SECONDS
    # Where agents enrol (TLS without a client certificate); None: enrolment is off.
    enrol_listen: str | None = None
    certificate_days: float = DEFAULT_CERTIFICATE_DAYS

    @property
    def certificate_lifetime(self) -> timedelta:
        return timedelta(days=self.certificate_days)

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(
            ca=self.pki_dir / "ca.crt",
            cert=self.pki_dir / "controller.crt",
            key=self.pki_dir / "controller.key",
        )

    @property
    def listen_host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def catalog_path(self) -> Path:
        return self.state_dir / "catalog.sqlite"

    def datastore_path(self, vault: str) -> Path:
        return self.state_dir / "datastores" / vault

    @staticmethod
    def load(path: Path) -> ControllerConfig:
        """The config file at `path`; ConfigInvalid naming every problem in it."""
        return load(path, ControllerFile, "controller config").config(path.parent.absolute())


class MqttSection(Section):
    """`[mqtt]`: an existing broker instead of the private one."""

    host: Host
    port: Port


def _chunk_size(size: int) -> int:
    if not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE or size & (size - 1):
        raise ValueError(
            f"{size} is not a power of two from {MIN_CHUNK_SIZE} (4 KiB) to "
            f"{MAX_CHUNK_SIZE} (16 MiB)"
        )
    return size


class ControllerFile(Section):
    """What `controller.toml` may hold (README "Running it for real")."""

    listen: ListenAddress = "127.0.0.1:7443"
    state_dir: NonEmpty
    pki_dir: NonEmpty
    chunk_size: Annotated[int, AfterValidator(_chunk_size)] = DEFAULT_CHUNK_SIZE
    mqtt: MqttSection | None = None
    advertise_host: Host | None = None
    gc_grace_seconds: Annotated[float, Field(ge=0)] = DEFAULT_GC_GRACE_SECONDS
    enrol_listen: ListenAddress | None = None
    certificate_days: Annotated[float, Field(gt=0, le=MAX_CERTIFICATE_DAYS)] = (
        DEFAULT_CERTIFICATE_DAYS
    )

    def config(self, base: Path) -> ControllerConfig:
        """The controller's config, paths relative to `base` (the file's directory)."""
        return ControllerConfig(
            listen=self.listen,
            state_dir=base / self.state_dir,
            pki_dir=base / self.pki_dir,
            chunk_size=self.chunk_size,
            mqtt=MqttBroker(self.mqtt.host, self.mqtt.port) if self.mqtt is not None else None,
            advertise_host=self.advertise_host,
            gc_grace_seconds=self.gc_grace_seconds,
            enrol_listen=self.enrol_listen,
            certificate_days=self.certificate_days,
        )
