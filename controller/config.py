"""The controller's configuration file (TOML): its schema, its defaults, what it becomes."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Self

from pydantic import AfterValidator, Field, model_validator

from controller.datastore.lease import DEFAULT_LEASE_SECONDS
from controller.datastore.s3 import S3Settings, parse_s3_url
from shared.address import parse_address
from shared.config import Host, ListenAddress, NonEmpty, Port, Seconds, Section, checked, load
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
MASTER_KEY_NAME = "master.key"
"""The master key file the controller makes in its state directory when none is configured."""
PASSPHRASE_VARIABLE = "COFFER_MASTER_PASSPHRASE"
"""The environment variable a master passphrase is read from when the config names no key."""
# An S3 lease renews every third of its duration: shorter than this would renew every second.
MIN_LEASE_SECONDS = 3.0
# Certificates the controller issues (enrolment, renewal, its own) live this long; agents and
# the controller renew theirs after 2/3 of it.
DEFAULT_CERTIFICATE_DAYS = 90.0
MAX_CERTIFICATE_DAYS = 3650.0


@dataclass(frozen=True)
class MqttBroker:
    host: str
    port: int


@dataclass(frozen=True)
class DatastoreSettings:
    """`[datastore]`: where the vaults' datastores live; each vault under its own name there."""

    url: str
    """An absolute directory, or s3://bucket/prefix."""
    s3: S3Settings | None = None
    """How to reach the bucket (unset fields from the environment, AWS_*); None for a directory."""
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    """How long the writer lease on an S3 datastore lasts unless renewed (every third of it)."""

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")


@dataclass(frozen=True)
class CopyTargetSettings:
    """`[[copy_targets]]`: a second place vaults copy their recovery points to (controller.copies).

    Like `[datastore]`, a root: a vault's copy is the vault's name under `url`."""

    name: str
    url: str
    """An absolute directory, or s3://bucket/prefix."""
    s3: S3Settings | None = None
    lease_seconds: float = DEFAULT_LEASE_SECONDS

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")


@dataclass(frozen=True)
class EncryptionSettings:
    """`[encryption]`: the master key that wraps every encrypted vault's keys. With neither file
    named: the passphrase in COFFER_MASTER_PASSPHRASE if set, else `state_dir/master.key`,
    made on the first start."""

    master_key_file: Path | None = None
    passphrase_file: Path | None = None


DEFAULT_LOGIN_LINK_SECONDS = 300.0
MAX_LOGIN_LINK_SECONDS = 3600.0


@dataclass(frozen=True)
class WebSettings:
    """`[web]`: the web console (off unless the section is there; controller/web)."""

    listen: str
    """host:port of its HTTPS listener."""
    url: str | None = None
    """The address operators open, as sign-in links give it (default: https://, the advertised
    or listen host, and the port it got)."""
    cert_file: Path | None = None
    """Its own certificate chain and key (e.g. one browsers already trust); default: the
    controller's certificate from its CA, which the console then follows through renewals."""
    key_file: Path | None = None
    login_link_seconds: float = DEFAULT_LOGIN_LINK_SECONDS
    """How long a sign-in link from `coffer web login` can be used (once)."""
    session_minutes: float = 480.0
    """A session ends this long after sign-in, whatever happens."""
    idle_minutes: float = 30.0
    """... or after this long without a request."""


@dataclass(frozen=True)
class MetricsSettings:
    """`[metrics]`: the Prometheus endpoint (off unless the section is there)."""

    listen: str
    """host:port of a plain HTTP listener on a loopback address (docs/decisions.md)."""


@dataclass(frozen=True)
class WebhookSettings:
    url: str
    timeout: float = 10.0
    max_attempts: int = 5


@dataclass(frozen=True)
class EmailSettings:
    host: str
    to: tuple[str, ...]
    sender: str
    port: int = 25
    starttls: bool = False
    username: str | None = None
    password_file: Path | None = None
    timeout: float = 30.0
    max_attempts: int = 5


@dataclass(frozen=True)
class JobSettings:
    """`[jobs]`: how long an agent may stay silent about a job it was sent before the job
    fails with AgentSilent (controller/jobs/agent_command.py), and how long a manual backup
    waits for its agent."""

    acknowledge_seconds: float = 120.0
    """From a command sent to the agent's first word of its job."""
    silence_seconds: float = 600.0
    """Between two words of the agent about a job it took (heartbeats name it every
    min(30 s, a quarter of this))."""
    manual_window_seconds: float = 7200.0
    """How long a manual backup waits in its queue for its agent and a slot."""


@dataclass(frozen=True)
class AlertSettings:
    """`[alerts]`: when conditions are checked, and where alerts go besides MQTT and the
    catalog (controller/alerts.py)."""

    check_seconds: float = 60.0
    agent_offline_seconds: float = 900.0
    """An agent offline this long raises an alert."""
    rpo_grace_seconds: float = 3600.0
    """Slack beyond the policy's longest gap between backups before a VM's RPO is breached."""
    webhooks: tuple[WebhookSettings, ...] = ()
    email: EmailSettings | None = None


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
    # None: a directory `datastores` in the state directory.
    datastore: DatastoreSettings | None = None
    encryption: EncryptionSettings = field(default_factory=EncryptionSettings)
    # Where vaults may copy their recovery points (`coffer vault update V --copy-to NAME`).
    copy_targets: tuple[CopyTargetSettings, ...] = ()

    @property
    def datastores(self) -> DatastoreSettings:
        """Where the vaults' datastores live (the configured place, or the default)."""
        if self.datastore is not None:
            return self.datastore
        return DatastoreSettings(str(self.state_dir / "datastores"))

    @property
    def default_master_key_file(self) -> Path:
        return self.state_dir / MASTER_KEY_NAME

    # Where agents enrol (TLS without a client certificate); None: enrolment is off.
    enrol_listen: str | None = None
    # Operators' own listener (the operator service only), so that agents filling `listen`
    # never lock operators out (docs/fleet.md); None: operators use `listen` alone.
    operator_listen: str | None = None
    certificate_days: float = DEFAULT_CERTIFICATE_DAYS
    web: WebSettings | None = None
    metrics: MetricsSettings | None = None
    alerts: AlertSettings = field(default_factory=AlertSettings)
    jobs: JobSettings = field(default_factory=JobSettings)

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

    @staticmethod
    def load(path: Path) -> ControllerConfig:
        """The config file at `path`; ConfigInvalid naming every problem in it."""
        return load(path, ControllerFile, "controller config").config(path.parent.absolute())


class MqttSection(Section):
    """`[mqtt]`: an existing broker instead of the private one."""

    host: Host
    port: Port


def _datastore_url(url: str) -> str:
    if url.startswith("s3://"):
        parse_s3_url(url)
        return url
    if "://" in url.removeprefix("file://"):
        raise ValueError(f"{url!r} is neither a directory nor s3://bucket/prefix")
    return url


def _endpoint(url: str) -> str:
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    return url


# Keys that only an s3:// url uses.
_S3_KEYS = (
    "endpoint",
    "region",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "allow_http",
    "max_concurrent_requests",
    "max_attempts",
    "connect_timeout",
    "request_timeout",
    "lease_seconds",
)


class DatastoreSection(Section):
    """`[datastore]`: where the vaults' datastores live (README "Running it for real")."""

    url: Annotated[str, Field(min_length=1), checked(_datastore_url)] | None = None
    endpoint: Annotated[str, AfterValidator(_endpoint)] | None = None
    region: NonEmpty | None = None
    access_key_id: NonEmpty | None = None
    secret_access_key: NonEmpty | None = None
    session_token: NonEmpty | None = None
    allow_http: bool = False
    max_concurrent_requests: Annotated[int, Field(ge=1, le=256)] = 16
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    connect_timeout: Seconds = 5.0
    request_timeout: Seconds = 60.0
    lease_seconds: Annotated[float, Field(ge=MIN_LEASE_SECONDS)] = DEFAULT_LEASE_SECONDS

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not (self.url or "").startswith("s3://"):
            given = [key for key in _S3_KEYS if key in self.model_fields_set]
            if given:
                raise ValueError(f"{', '.join(given)}: only for an s3:// url")
            return self
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key go together")
        plain = self.endpoint is not None and self.endpoint.startswith("http://")
        if plain and not self.allow_http:
            raise ValueError(
                f"endpoint {self.endpoint} is plain HTTP: use https, or set allow_http = "
                "true for a store on this machine or a trusted network"
            )
        return self

    def settings(self, base: Path, state_dir: Path) -> DatastoreSettings:
        url = self.url or str(state_dir / "datastores")
        if not url.startswith("s3://"):
            return DatastoreSettings(str(base / url.removeprefix("file://")))
        return DatastoreSettings(
            url,
            S3Settings(
                endpoint=self.endpoint,
                region=self.region,
                access_key_id=self.access_key_id,
                secret_access_key=self.secret_access_key,
                session_token=self.session_token,
                allow_http=self.allow_http,
                max_concurrent_requests=self.max_concurrent_requests,
                max_attempts=self.max_attempts,
                connect_timeout=self.connect_timeout,
                request_timeout=self.request_timeout,
            ),
            self.lease_seconds,
        )


COPY_TARGET_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def _copy_target_name(name: str) -> str:
    if COPY_TARGET_NAME.fullmatch(name) is None:
        raise ValueError(f"{name!r} is not 1-63 lowercase letters, digits or '-'")
    return name


class CopyTargetSection(DatastoreSection):
    """`[[copy_targets]]`: a named second store for off-site copies; the keys of `[datastore]`."""

    name: Annotated[str, AfterValidator(_copy_target_name)]
    url: Annotated[str, Field(min_length=1), checked(_datastore_url)]

    def target(self, base: Path, state_dir: Path) -> CopyTargetSettings:
        where = self.settings(base, state_dir)
        return CopyTargetSettings(self.name, where.url, where.s3, where.lease_seconds)


def _place(url: str) -> tuple[str, ...]:
    """Where a root is, as path parts: ('s3', bucket, *prefix) or ('dir', *path)."""
    if url.startswith("s3://"):
        bucket, prefix = parse_s3_url(url)
        return ("s3", bucket, *[part for part in prefix.split("/") if part])
    return ("dir", *Path(url.removeprefix("file://")).parts)


def _overlapping(one: str, other: str) -> bool:
    """Whether one root is the other or lies inside it (two S3 endpoints are taken as one: a
    bucket name may well be the same store under two names)."""
    a, b = _place(one), _place(other)
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]


class EncryptionSection(Section):
    """`[encryption]`: the master key (docs/encryption.md)."""

    master_key_file: NonEmpty | None = None
    passphrase_file: NonEmpty | None = None

    @model_validator(mode="after")
    def _one_key(self) -> Self:
        if self.master_key_file is not None and self.passphrase_file is not None:
            raise ValueError("a master key file or a passphrase file, not both")
        return self

    def settings(self, base: Path) -> EncryptionSettings:
        return EncryptionSettings(
            master_key_file=base / self.master_key_file if self.master_key_file else None,
            passphrase_file=base / self.passphrase_file if self.passphrase_file else None,
        )


def _loopback(address: str) -> str:
    host = parse_address(address, allow_port_zero=True).host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(
            f"{address!r} is not a loopback address: the metrics listener is plain HTTP "
            "without authentication, so it listens on 127.0.0.1 or ::1 only (scrape it "
            "from this host, or through a proxy that adds TLS and authentication)"
        )
    return address


class WebSection(Section):
    """`[web]`: the web console (README "The web console")."""

    listen: ListenAddress
    url: Annotated[str, AfterValidator(_endpoint)] | None = None
    cert_file: NonEmpty | None = None
    key_file: NonEmpty | None = None
    login_link_seconds: Annotated[float, Field(ge=10, le=MAX_LOGIN_LINK_SECONDS)] = (
        DEFAULT_LOGIN_LINK_SECONDS
    )
    session_minutes: Annotated[float, Field(gt=0, le=7 * 24 * 60)] = 480.0
    idle_minutes: Annotated[float, Field(gt=0, le=7 * 24 * 60)] = 30.0

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.url is not None and not self.url.startswith("https://"):
            raise ValueError(f"url {self.url!r}: the console is served over https only")
        return self

    def settings(self, base: Path) -> WebSettings:
        return WebSettings(
            listen=self.listen,
            url=self.url.rstrip("/") if self.url else None,
            cert_file=base / self.cert_file if self.cert_file else None,
            key_file=base / self.key_file if self.key_file else None,
            login_link_seconds=self.login_link_seconds,
            session_minutes=self.session_minutes,
            idle_minutes=self.idle_minutes,
        )


class MetricsSection(Section):
    """`[metrics]`: the Prometheus endpoint."""

    listen: Annotated[str, AfterValidator(_loopback)]


class WebhookSection(Section):
    """`[[alerts.webhooks]]`: a URL alerts are POSTed to as JSON."""

    url: Annotated[str, AfterValidator(_endpoint)]
    timeout: Seconds = 10.0
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 5


class EmailSection(Section):
    """`[alerts.email]`: an SMTP server alerts are mailed through."""

    host: Host
    port: Port = 25
    sender: NonEmpty
    to: Annotated[list[NonEmpty], Field(min_length=1)]
    starttls: bool = False
    username: NonEmpty | None = None
    password_file: NonEmpty | None = None
    timeout: Seconds = 30.0
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 5

    @model_validator(mode="after")
    def _login(self) -> Self:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        return self


class JobsSection(Section):
    """`[jobs]`: README "Dispatch" (docs/fleet.md)."""

    # Agents acknowledge a command as they take it and name their jobs in every heartbeat
    # (5 s): keep the silence several heartbeats long, or live jobs fail.
    acknowledge_seconds: Annotated[float, Field(ge=1, le=86_400)] = 120.0
    silence_seconds: Annotated[float, Field(ge=1, le=7 * 86_400)] = 600.0
    manual_window_seconds: Annotated[float, Field(ge=1, le=7 * 86_400)] = 7200.0

    def settings(self) -> JobSettings:
        return JobSettings(
            self.acknowledge_seconds, self.silence_seconds, self.manual_window_seconds
        )


class AlertsSection(Section):
    """`[alerts]`: README "Alerts"."""

    check_seconds: Annotated[float, Field(ge=1, le=3600)] = 60.0
    agent_offline_seconds: Annotated[float, Field(ge=1)] = 900.0
    rpo_grace_seconds: Annotated[float, Field(ge=0)] = 3600.0
    webhooks: list[WebhookSection] = []
    email: EmailSection | None = None

    def settings(self, base: Path) -> AlertSettings:
        email = self.email
        return AlertSettings(
            check_seconds=self.check_seconds,
            agent_offline_seconds=self.agent_offline_seconds,
            rpo_grace_seconds=self.rpo_grace_seconds,
            webhooks=tuple(
                WebhookSettings(w.url, w.timeout, w.max_attempts) for w in self.webhooks
            ),
            email=EmailSettings(
                host=email.host,
                port=email.port,
                sender=email.sender,
                to=tuple(email.to),
                starttls=email.starttls,
                username=email.username,
                password_file=base / email.password_file if email.password_file else None,
                timeout=email.timeout,
                max_attempts=email.max_attempts,
            )
            if email is not None
            else None,
        )


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
    datastore: DatastoreSection | None = None
    encryption: EncryptionSection | None = None
    enrol_listen: ListenAddress | None = None
    operator_listen: ListenAddress | None = None
    certificate_days: Annotated[float, Field(gt=0, le=MAX_CERTIFICATE_DAYS)] = (
        DEFAULT_CERTIFICATE_DAYS
    )
    web: WebSection | None = None
    metrics: MetricsSection | None = None
    alerts: AlertsSection | None = None
    jobs: JobsSection | None = None
    copy_targets: list[CopyTargetSection] = []

    @model_validator(mode="after")
    def _copy_targets_apart(self) -> Self:
        # Checked on the urls as written; relative directories are compared as written too.
        names = [target.name for target in self.copy_targets]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"[[copy_targets]]: more than one is named {', '.join(twice)}")
        datastore = self.datastore.url if self.datastore and self.datastore.url else None
        roots = [("[datastore] url", datastore or str(Path(self.state_dir) / "datastores"))]
        for target in self.copy_targets:
            for what, url in roots:
                if _overlapping(target.url, url):
                    raise ValueError(
                        f"[[copy_targets]] {target.name!r}: url {target.url} overlaps {what} "
                        f"{url}: a copy must live apart from the data it copies and from other "
                        "copies"
                    )
            roots.append((f"copy target {target.name!r}", target.url))
        return self

    def config(self, base: Path) -> ControllerConfig:
        """The controller's config, paths relative to `base` (the file's directory)."""
        state_dir = base / self.state_dir
        return ControllerConfig(
            listen=self.listen,
            state_dir=state_dir,
            pki_dir=base / self.pki_dir,
            chunk_size=self.chunk_size,
            mqtt=MqttBroker(self.mqtt.host, self.mqtt.port) if self.mqtt is not None else None,
            advertise_host=self.advertise_host,
            gc_grace_seconds=self.gc_grace_seconds,
            datastore=self.datastore.settings(base, state_dir) if self.datastore else None,
            encryption=self.encryption.settings(base) if self.encryption else EncryptionSettings(),
            copy_targets=tuple(target.target(base, state_dir) for target in self.copy_targets),
            enrol_listen=self.enrol_listen,
            operator_listen=self.operator_listen,
            certificate_days=self.certificate_days,
            web=self.web.settings(base) if self.web else None,
            metrics=MetricsSettings(self.metrics.listen) if self.metrics else None,
            alerts=self.alerts.settings(base) if self.alerts else AlertSettings(),
            jobs=self.jobs.settings() if self.jobs else JobSettings(),
        )
