"""The controller's configuration file (TOML) and its defaults."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from shared.errors import InvalidArgument
from shared.tls import TlsFiles

# Chosen with the benchmark (tests/bench, table in the foundation issue's closing note): on a
# 2 GiB ext4 image, 512 KiB chunks add a quarter fewer bytes than 1 MiB for file-level edits
# (72.5 against 97.7 MiB, restic 76.6) and still back up and restore faster than borg and
# restic; 256 KiB adds less again but cost 60% more time per full backup.
DEFAULT_CHUNK_SIZE = 512 << 10
# Longer than any backup takes between uploading a chunk and committing its recovery point.
DEFAULT_GC_GRACE_SECONDS = 6 * 3600.0


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
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidArgument(detail=f"cannot read controller config {path}: {exc}") from exc
        base = path.parent.absolute()
        try:
            mqtt = raw.get("mqtt")
            chunk_size = int(raw.get("chunk_size", DEFAULT_CHUNK_SIZE))
            config = ControllerConfig(
                listen=str(raw.get("listen", "127.0.0.1:7443")),
                state_dir=base / str(raw["state_dir"]),
                pki_dir=base / str(raw["pki_dir"]),
                chunk_size=chunk_size,
                mqtt=MqttBroker(str(mqtt["host"]), int(mqtt["port"]))
                if mqtt and mqtt.get("host")
                else None,
                advertise_host=raw.get("advertise_host"),
                gc_grace_seconds=float(raw.get("gc_grace_seconds", DEFAULT_GC_GRACE_SECONDS)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(detail=f"controller config {path}: bad or missing {exc}") from exc
        if chunk_size < 4096 or chunk_size > 16 << 20 or chunk_size & (chunk_size - 1):
            raise InvalidArgument(
                detail=f"chunk_size {chunk_size} must be a power of two from 4 KiB to 16 MiB"
            )
        return config
