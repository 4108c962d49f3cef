"""The agent's configuration file (TOML): who this VM is, where the controller is, its disks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Self

from pydantic import Field, model_validator

from agent.consistency import ConsistencyPolicy, ConsistencySection, ProviderName
from shared.config import Host, HostPort, NonEmpty, Section, checked, load
from shared.hello import MAX_DISK_PATH, MAX_DISKS, check_display_name, check_group_name
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
        """The config file at `path`; ConfigInvalid naming every problem in it."""
        return load(path, AgentFile, "agent config").config(path.parent.absolute())


class DiskSection(Section):
    """A `[[disks]]` table: a disk of the VM, and the snapshot providers it may use."""

    name: Annotated[str, checked(check_disk_name)]
    path: Annotated[str, Field(min_length=1, max_length=MAX_DISK_PATH)]
    # This disk's providers, e.g. ["read-while-frozen"]; default: [consistency] snapshot.
    snapshot: list[ProviderName] | None = None


class AgentFile(Section):
    """What `agent.toml` may hold (README "Running it for real")."""

    vm_id: Annotated[str, checked(validate_vm_id)]
    # What the hello says of the VM: within the limits the controller checks (shared.hello).
    name: Annotated[str, checked(check_display_name)] | None = None  # default: vm_id
    service: Annotated[str, checked(partial(check_group_name, what="service"))] = "default"
    region: Annotated[str, checked(partial(check_group_name, what="region", empty=True))] = ""
    controller: HostPort
    tls_dir: NonEmpty
    state_dir: NonEmpty = "/var/lib/coffer-agent"
    restore_dirs: list[NonEmpty] = []
    controller_name: Host | None = None
    disks: list[DiskSection] = []
    consistency: ConsistencySection = ConsistencySection()

    @model_validator(mode="after")
    def _disk_names_differ(self) -> Self:
        names = [d.name for d in self.disks]
        if repeated := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"disk names repeat in [[disks]]: {', '.join(repeated)}")
        if len(names) > MAX_DISKS:
            raise ValueError(f"{len(names)} [[disks]]; a VM has at most {MAX_DISKS}")
        return self

    def config(self, base: Path) -> AgentConfig:
        """The agent's config, paths relative to `base` (the file's directory)."""
        consistency = self.consistency.policy()
        chosen = {d.name: tuple(d.snapshot) for d in self.disks if d.snapshot is not None}
        if chosen:
            consistency = dataclasses.replace(consistency, disk_providers=chosen)
        return AgentConfig(
            vm_id=self.vm_id,
            name=self.name if self.name is not None else self.vm_id,
            service=self.service,
            region=self.region,
            controller=self.controller,
            tls_dir=base / self.tls_dir,
            state_dir=base / self.state_dir,
            disks=tuple(DiskConfig(d.name, base / d.path) for d in self.disks),
            restore_dirs=tuple(base / p for p in self.restore_dirs),
            controller_name=self.controller_name,
            consistency=consistency,
        )
