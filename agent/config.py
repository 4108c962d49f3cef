"""The agent's configuration file (TOML): who this VM is, where the controller is, its disks."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from agent.consistency import ConsistencyPolicy
from shared.errors import InvalidArgument
from shared.index import check_disk_name
from shared.tls import TlsFiles, validate_vm_id


@dataclass(frozen=True)
class DiskConfig:
    name: str
    path: Path


@dataclass(frozen=True)
class AgentConfig:
    vm_id: str
    name: str
    service: str
    region: str
    controller: str
    tls_dir: Path
    state_dir: Path
    disks: tuple[DiskConfig, ...]
    restore_dirs: tuple[Path, ...] = ()
    # TLS name the controller's certificate must carry, when it differs from the address.
    controller_name: str | None = None
    # How backups are made consistent: scripts, freeze, snapshot providers ([consistency]).
    consistency: ConsistencyPolicy = field(default_factory=ConsistencyPolicy)

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(
            ca=self.tls_dir / "ca.crt",
            cert=self.tls_dir / "agent.crt",
            key=self.tls_dir / "agent.key",
        )

    def disk(self, name: str) -> DiskConfig | None:
        return next((d for d in self.disks if d.name == name), None)

    @staticmethod
    def load(path: Path) -> AgentConfig:
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidArgument(detail=f"cannot read agent config {path}: {exc}") from exc
        base = path.parent.absolute()
        try:
            vm_id = validate_vm_id(str(raw["vm_id"]))
            disks = tuple(
                DiskConfig(check_disk_name(str(d["name"])), base / str(d["path"]))
                for d in raw.get("disks", [])
            )
            consistency = ConsistencyPolicy.from_toml(raw.get("consistency", {}))
            # A disk may name its own snapshot providers, e.g. snapshot = ["read-while-frozen"].
            chosen = {
                str(d["name"]): tuple(str(p) for p in d["snapshot"])
                for d in raw.get("disks", [])
                if "snapshot" in d
            }
            if chosen:
                consistency = dataclasses.replace(consistency, disk_providers=chosen)
            config = AgentConfig(
                vm_id=vm_id,
                name=str(raw.get("name", vm_id)),
                service=str(raw.get("service", "default")),
                region=str(raw.get("region", "")),
                controller=str(raw["controller"]),
                tls_dir=base / str(raw["tls_dir"]),
                state_dir=base / str(raw.get("state_dir", "/var/lib/coffer-agent")),
                disks=disks,
                restore_dirs=tuple(base / str(p) for p in raw.get("restore_dirs", [])),
                controller_name=raw.get("controller_name"),
                consistency=consistency,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(detail=f"agent config {path}: bad or missing {exc}") from exc
        names = [d.name for d in disks]
        if len(set(names)) != len(names):
            raise InvalidArgument(detail=f"agent config {path}: disk names repeat: {names}")
        return config
