"""The private broker: a Mosquitto child process the controller runs when none is configured.

A one-machine install needs no MQTT setup: the controller writes a `mosquitto.conf` and an
ACL into its work directory, starts Mosquitto in its own process group, waits until it
completes a real TLS handshake, and restarts it (with backoff) whenever it exits on its own.
The loop that watches the child runs under a `Supervisor` (RESTART): should the loop itself
fail, a bug, it is logged with its traceback and watches again, rather than leave the broker
unwatched in silence.

The configuration is the security model of `docs/mqtt.md`, the same as the production example
in `deploy/mosquitto/` (a test holds the two to the same ACL and limits):

- one TLS listener; a client certificate from the Coffer CA is required, and its CN becomes
  the MQTT user name and client id (`use_identity_as_username`, `use_username_as_clientid`),
  so a client cannot claim another identity nor kick another client off by reusing its id;
- the ACL names exact topics only: `coffer-controller` reads agents' presence and progress,
  publishes job states and may clear agents' retained messages; every other user (an agent,
  named by its VM id) may publish exactly its own presence and its own jobs' progress, and
  nothing else under its prefix, so it cannot make the broker keep messages on topics of its
  choosing; readers (operator certificates) read status and publish nothing;
- limits on what one client can make the broker hold (`LIMITS`): packet size, messages
  queued for a subscriber, connections, keepalive, memory;
- no persistence: after a restart the retained presences are rebuilt by the agents
  reconnecting, instead of showing agents "online" that died while the broker was down.

The child's stdout and stderr go to `mosquitto.log` in the work directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pwd
import resource
import signal
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from shared.backoff import Backoff
from shared.errors import InvalidArgument, Unavailable
from shared.status import (
    ALERT_FILTER,
    CONTROLLER_USERNAME,
    JOB_STATE_FILTER,
    MAX_PAYLOAD_BYTES,
    PRESENCE_FILTER,
    PROGRESS_FILTER,
    TOPIC_ROOT,
)
from shared.supervision import Policy, Supervisor
from shared.tls import TlsFiles, mqtt_ssl_context, validate_operator_name

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

CONFIG_NAME: Final = "mosquitto.conf"
ACL_NAME: Final = "acl"
LOG_NAME: Final = "mosquitto.log"

# A broker that ran this long before exiting was healthy: restart it without delay growth.
_STABLE_SECONDS: Final = 30.0
_RESTART: Final = Backoff(first=0.5, cap=10.0, jitter="equal")
_PROBE_INTERVAL: Final = 0.05
_LOG_TAIL_BYTES: Final = 2048

# The fleet one controller serves (docs/DESIGN: 10,000 agents is the design point).
DESIGN_AGENTS: Final = 10_000


@dataclass(frozen=True)
class Limits:
    """What Mosquitto lets one client make it hold; docs/mqtt.md "Limits" says why each."""

    # Whole MQTT packet: the largest payload readers accept, plus the longest topic (about
    # 230 bytes), the fixed header and MQTT 5 properties. A bigger packet disconnects its
    # sender: it is not Coffer's.
    max_packet_size: int = MAX_PAYLOAD_BYTES + 1024
    # QoS 1 messages in flight to a subscriber that speaks MQTT 3.1.1 (readers): Mosquitto's
    # default. The controller sets its own with MQTT 5's Receive Maximum (controller/status.py).
    max_inflight_messages: int = 20
    # Messages queued for one subscriber beyond those in flight (only the controller and
    # readers subscribe; agents never do). When the controller (re)subscribes while the fleet
    # reconnects, it is sent every agent's retained presence, each agent's new presence and
    # their progress at once: four per agent of the design fleet fit. Mosquitto's default of
    # 1000 dropped the controller's messages when 2,000 agents connected within 6 s.
    max_queued_messages: int = 4 * DESIGN_AGENTS
    # ...and at most this many bytes of them (real payloads are a few hundred bytes).
    max_queued_bytes: int = 32 << 20
    # Connections on the listener: the design fleet, the controller and readers, and room
    # for reconnect overlap (a half-dead connection and its replacement, briefly both).
    max_connections: int = DESIGN_AGENTS + DESIGN_AGENTS // 4
    # MQTT 5 clients may not ask for a longer keepalive than this (Coffer's clients use 15 s):
    # a dead client's will is published within 1.5 keepalives.
    max_keepalive: int = 60
    # Sessions of clients that asked for a persistent one (Coffer's never do) are dropped
    # after this long away, with whatever the broker kept for them.
    persistent_client_expiration: str = "1h"
    # A backstop on the broker's whole heap (Mosquitto's own accounting): far above what the
    # design fleet costs (docs/mqtt.md), so reaching it means an attack or a leak, and then
    # the broker refuses messages and drops their senders rather than take the host's memory.
    memory_limit: int = 1 << 30

    @property
    def open_files(self) -> int:
        """File descriptors the broker needs: one per connection, and a few of its own."""
        return self.max_connections + 64


LIMITS: Final = Limits()


class PrivateBroker:
    """A supervised Mosquitto serving Coffer's status topics on one TLS listener.

    `tls` is the broker's server certificate, key and the CA that issued the clients'
    certificates: the controller's own files (its certificate has serverAuth and SANs for
    localhost and 127.0.0.1). `port=0` picks a free port once; restarts keep it. `readers`
    are operator certificate names given read-only access to all of `coffer/` (a dashboard
    or alerting consumer).
    """

    def __init__(
        self,
        work_dir: Path,
        tls: TlsFiles,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        executable: str = "mosquitto",
        readers: Sequence[str] = (),
        limits: Limits = LIMITS,
        ready_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        crl: Path | None = None,
    ) -> None:
        self._work_dir = work_dir.absolute()
        self._tls = TlsFiles(ca=tls.ca.absolute(), cert=tls.cert.absolute(), key=tls.key.absolute())
        # The CA's revocation list (Mosquitto's `crlfile`); `reload` makes it read it again.
        self._crl = crl.absolute() if crl is not None else None
        paths = (self._work_dir, self._tls.ca, self._tls.cert, self._tls.key, self._crl)
        for path in filter(None, paths):
            # mosquitto.conf values end at the first blank; such a path cannot be written there.
            if any(c.isspace() for c in str(path)):
                raise InvalidArgument(detail=f"the private broker cannot use the path {path!r}")
        if not 0 <= port <= 65535:
            raise InvalidArgument(detail=f"port {port} is not a TCP port")
        self._host = host
        self._port = port
        self._executable = executable
        self._readers = tuple(validate_operator_name(name) for name in readers)
        self._limits = limits
        self._ready_timeout = ready_timeout
        self._stop_timeout = stop_timeout
        self._process: asyncio.subprocess.Process | None = None
        self._tasks: Supervisor | None = None
        self._probe_context: ssl.SSLContext | None = None
        self._restarts = 0

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The listener's port (the one picked, once started with `port=0`)."""
        return self._port

    @property
    def pid(self) -> int | None:
        """The running Mosquitto's PID; None while it is stopped or being restarted."""
        process = self._process
        if process is None or process.returncode is not None:
            return None
        return process.pid

    @property
    def open_files(self) -> int:
        """The broker's open-file limit: the controller's (raised to the hard limit at its
        start), raised in the child to what `Limits.open_files` asks if the hard limit allows."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(soft, _wanted(self._limits.open_files, hard))

    @property
    def agent_capacity(self) -> int:
        """Agents the broker can hold: its connection limit, or what its descriptors allow
        (one each, beside its own few and the controller's and readers' connections)."""
        return max(0, min(self._limits.max_connections, self.open_files - 64) - 16)

    @property
    def restarts(self) -> int:
        """How many times Mosquitto was restarted after exiting on its own."""
        return self._restarts

    def reload(self) -> None:
        """Have Mosquitto read its certificate and CRL again (SIGHUP): the CRL applies to
        every connection from then on; connections already open stay."""
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGHUP)

    @property
    def config_path(self) -> Path:
        return self._work_dir / CONFIG_NAME

    @property
    def log_path(self) -> Path:
        return self._work_dir / LOG_NAME

    async def __aenter__(self) -> Self:
        if self._port == 0:
            self._port = _free_port(self._host)
        self._probe_context = await asyncio.to_thread(mqtt_ssl_context, self._tls)
        await asyncio.to_thread(self._write_config)
        try:
            self._process = await self._spawn()
            await self._wait_ready(self._process)
        except BaseException:
            await self._stop_child()
            raise
        tasks = Supervisor(f"private broker :{self._port}")
        await tasks.__aenter__()
        self._tasks = tasks
        # RESTART: what the loop watches is the child (`self._process`); a loop that failed
        # starts watching it again (or starts a new one).
        tasks.start("watch", self._watch, policy=Policy.RESTART)
        log.info(
            "private MQTT broker on %s:%d (pid %s): open-file limit %d, room for %d agents "
            "(max_connections %d)",
            self._host,
            self._port,
            self.pid,
            self.open_files,
            self.agent_capacity,
            self._limits.max_connections,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The watch goes first, so it cannot restart the child we are about to stop.
        tasks, self._tasks = self._tasks, None
        if tasks is not None:
            await tasks.__aexit__(None, None, None)
        await self._stop_child()

    # --- configuration -------------------------------------------------------------------

    def _write_config(self) -> None:
        self._work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        acl_path = self._work_dir / ACL_NAME
        _write_text(acl_path, acl_text(self._readers))
        _write_text(
            self.config_path,
            config_text(
                host=self._host,
                port=self._port,
                tls=self._tls,
                acl_path=acl_path,
                # Mosquitto started as root drops to user `mosquitto`, which could not read
                # the key in our private work directory; stay whoever we are.
                user=pwd.getpwuid(os.geteuid()).pw_name,
                limits=self._limits,
                crl=self._crl,
            ),
        )

    # --- the child process ---------------------------------------------------------------

    async def _spawn(self) -> asyncio.subprocess.Process:
        with self.log_path.open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                self._executable,
                "-c",
                str(self.config_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                # Its own process group: a Ctrl-C at the controller's terminal is the
                # controller's to handle, and the broker is stopped by PID in order.
                start_new_session=True,
                # If the controller dies without stopping it (SIGKILL), the broker goes too
                # rather than holding the port as an orphan. And it may open a descriptor
                # per connection it allows.
                preexec_fn=lambda: _prepare_child(self._limits.open_files),
            )
        log.debug("started mosquitto (pid %d)", process.pid)
        return process

    async def _wait_ready(self, process: asyncio.subprocess.Process) -> None:
        """Return once the broker completes a TLS handshake; Unavailable if it does not in time."""
        assert self._probe_context is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ready_timeout
        probe_host = _probe_host(self._host)
        last_error: OSError | None = None
        while loop.time() < deadline:
            if process.returncode is not None:
                raise Unavailable(
                    detail=f"mosquitto exited with status {process.returncode} while starting; "
                    f"its log ({self.log_path}) ends with:\n{self._log_tail()}"
                )
            try:
                async with asyncio.timeout(max(0.1, deadline - loop.time())):
                    _, writer = await asyncio.open_connection(
                        probe_host, self._port, ssl=self._probe_context, server_hostname=probe_host
                    )
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                # Whoever answered, our child must still be alive to be the one listening.
                if process.returncode is None:
                    return
                continue
            except OSError as e:  # refused while starting; TimeoutError and SSLError are OSErrors
                last_error = e
            await asyncio.sleep(_PROBE_INTERVAL)
        raise Unavailable(
            detail=f"mosquitto (pid {process.pid}) did not accept TLS connections on "
            f"{self._host}:{self._port} within {self._ready_timeout:g}s "
            f"(last error: {last_error}); "
            f"its log ({self.log_path}) ends with:\n{self._log_tail()}"
        )

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            process = self._process
            # None: a restart failed to spawn, or the watch itself failed while it restarted.
            if process is not None:
                started = loop.time()
                returncode = await process.wait()
                log.warning(
                    "private MQTT broker (pid %d) exited with status %d; restarting it. "
                    "Log tail:\n%s",
                    process.pid,
                    returncode,
                    self._log_tail(),
                )
                if loop.time() - started > _STABLE_SECONDS:
                    attempt = 0
            await asyncio.sleep(_RESTART.delay(attempt))
            attempt += 1
            try:
                self._process = None
                self._process = await self._spawn()
                await self._wait_ready(self._process)
            except (OSError, Unavailable) as e:
                # The next turn waits for this child (if any) to exit, then tries again.
                log.error("could not restart the private MQTT broker: %s", e)
                continue
            self._restarts += 1
            log.info("private MQTT broker restarted (pid %d)", self._process.pid)

    async def _stop_child(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        try:
            process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            async with asyncio.timeout(self._stop_timeout):
                await process.wait()
        except TimeoutError:
            log.warning("mosquitto (pid %d) ignored SIGTERM; killing it", process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    def _log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
                return f.read().decode(errors="replace").strip()
        except OSError as e:
            return f"(log unreadable: {e})"


# --- pure pieces ---------------------------------------------------------------------------


def _prepare_child(open_files: int) -> None:
    """In the child, before exec: die with the parent, and raise the descriptor limit."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _wanted(open_files, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        # Up to the hard limit only (no error if that is lower: Mosquitto then refuses
        # connections past it, and logs so).
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _wanted(open_files: int, hard: int) -> int:
    return open_files if hard == resource.RLIM_INFINITY else min(open_files, hard)


def acl_text(readers: Sequence[str] = ()) -> str:
    """The ACL of the Coffer status model (see docs/mqtt.md), with read-only `readers`."""
    agent_progress = f"{TOPIC_ROOT}/agents/%u/jobs/+/progress"
    reader_lines = "".join(
        f"""
# Read-only status consumer (an operator certificate): reads status, publishes nothing, not
# even as the VM it would be if a VM had its name (the broker sees names, not roles).
user {name}
topic deny {TOPIC_ROOT}/agents/{name}/presence
topic deny {TOPIC_ROOT}/agents/{name}/jobs/+/progress
topic read {PRESENCE_FILTER}
topic read {PROGRESS_FILTER}
topic read {JOB_STATE_FILTER}
topic read {ALERT_FILTER}
"""
        for name in readers
    )
    return f"""\
# Coffer status ACL, written by the controller's private broker (see docs/mqtt.md).
# User names are client certificate CNs (use_identity_as_username). Every right names exact
# topics; a level is `+` only where the topic holds an id.

# The controller reads agents' presence and progress, publishes job states and alerts, and
# clears retained messages on agents' topics (a retired VM's presence; progress published
# retained). Only the controller may publish alerts: no agent pattern reaches them.
user {CONTROLLER_USERNAME}
topic readwrite {PRESENCE_FILTER}
topic readwrite {PROGRESS_FILTER}
topic write {JOB_STATE_FILTER}
topic write {ALERT_FILTER}
{reader_lines}
# Every agent (user name = its VM id) may publish its own presence (its last will included)
# and its own jobs' progress: these two topics and nothing else, so it cannot make the broker
# keep messages on topics of its choosing. Agents subscribe to nothing and read nothing: job
# states and other agents' presence are none of their business. Pattern lines apply to every
# user, whatever `user` line precedes them; a user name that is no VM id gets rights on topics
# no agent and no controller uses.
pattern write {TOPIC_ROOT}/agents/%u/presence
pattern write {agent_progress}
"""


def config_text(
    *,
    host: str,
    port: int,
    tls: TlsFiles,
    acl_path: Path,
    user: str,
    limits: Limits = LIMITS,
    crl: Path | None = None,
) -> str:
    """The mosquitto.conf of a private broker (see deploy/mosquitto/mosquitto.conf)."""
    return f"""\
# Written by the Coffer controller (private broker); rewritten at every start.
per_listener_settings false
allow_anonymous false
acl_file {acl_path}
persistence false
user {user}
# Limits (docs/mqtt.md "Limits").
max_packet_size {limits.max_packet_size}
max_inflight_messages {limits.max_inflight_messages}
max_queued_messages {limits.max_queued_messages}
max_queued_bytes {limits.max_queued_bytes}
max_keepalive {limits.max_keepalive}
persistent_client_expiration {limits.persistent_client_expiration}
memory_limit {limits.memory_limit}
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
log_timestamp true
log_timestamp_format %Y-%m-%dT%H:%M:%S

listener {port} {host}
max_connections {limits.max_connections}
cafile {tls.ca}
certfile {tls.cert}
keyfile {tls.key}
tls_version tlsv1.2
require_certificate true
use_identity_as_username true
use_username_as_clientid true
""" + (f"crlfile {crl}\n" if crl is not None else "")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.replace(path)


def _free_port(host: str) -> int:
    """A port free on `host` now (the broker binds it moments later; a race we accept)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _probe_host(host: str) -> str:
    """Where to reach a listener bound to `host` from this machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host
