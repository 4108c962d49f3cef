"""`coffer-agent doctor`: checks what a backup needs on this VM, and says what to fix.

Each check gives a verdict (ok, warn, fail), what it found and, unless ok, what to do. The
doctor changes nothing: it freezes no file system and takes no snapshot (it asks each
provider whether it could), it opens no session with the controller (the `Check` call
answers without one) and no MQTT session (a TLS handshake with the broker proves it is
reachable and trusted; an MQTT connection would take over the running agent's, whose client
id the broker forces to the VM id). A config the agent would refuse to start with is reported
as failed `config` checks, one per problem in it, and nothing else is checked.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import os
import socket
import ssl
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509

from agent.config import AgentConfig
from agent.disk_use import in_use_unseen, mounts_on_disk
from agent.displacement import Displacement
from agent.freeze import Mount, mounts
from agent.scripts import check_script
from agent.snapshot import choose
from agent.thaw_watchdog import ThawWatchdog
from shared.errors import CofferError, ConfigInvalid, DuplicateAgent
from shared.rpc import agent_pb2, agent_pb2_grpc
from shared.rpc_channel import secure_channel
from shared.tls import Identity, identity_of_certificate, mqtt_ssl_context

TIMEOUT_SECONDS = 5.0
SKEW_WARN_SECONDS = 5.0
SKEW_FAIL_SECONDS = 60.0
CERT_WARN_DAYS = 30
# How long after this agent had its session back a displacement is still worth a warning.
DISPLACED_WARN_SECONDS = 24 * 3600
# File systems FIFREEZE works on (those implementing freeze_fs / freeze_super in Linux).
FREEZABLE = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs", "nilfs2", "gfs2", "ocfs2"}
)


class Verdict(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Finding:
    check: str
    verdict: Verdict
    found: str
    fix: str = ""


class Doctor:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.findings: list[Finding] = []

    def note(self, check: str, verdict: Verdict, found: str, fix: str = "") -> None:
        self.findings.append(Finding(check, verdict, found, fix))

    async def run(self) -> list[Finding]:
        self.identity()
        self.displaced()
        reply = await self.controller()
        if reply is not None:
            self.clock(reply)
            self.broker(reply)
            self.registration(reply)
        self.privileges()
        await self.watchdog()
        self.disks()
        self.scripts()
        self.directories()
        return self.findings

    def privileges(self) -> None:
        if _has_cap_sys_admin():
            self.note("privileges", Verdict.OK, "may freeze file systems (CAP_SYS_ADMIN)")
        else:
            self.note(
                "privileges",
                Verdict.FAIL,
                "this user may not freeze file systems (no CAP_SYS_ADMIN): backups would "
                "only be crash-consistent",
                "run coffer-agent as root",
            )

    async def watchdog(self) -> None:
        """The thaw watchdog starts and answers (it runs beside every freeze)."""
        try:
            async with ThawWatchdog(deadline=5.0) as watchdog:
                await watchdog.disarm(Path("/"))  # a request it answers without acting
        except (CofferError, OSError) as exc:
            self.note(
                "thaw watchdog",
                Verdict.FAIL,
                f"`{sys.executable} -m agent.thaw_watchdog` does not start or answer: {exc}",
                "reinstall coffer-agent; backups cannot freeze file systems without it",
            )
            return
        self.note("thaw watchdog", Verdict.OK, "starts and answers")

    # --- identity and the controller ------------------------------------------------------

    def identity(self) -> None:
        tls = self.config.tls
        try:
            pem = tls.read()
        except CofferError as exc:
            self.note(
                "identity",
                Verdict.FAIL,
                str(exc),
                "put ca.crt, agent.crt, agent.key in "
                f"{self.config.tls_dir} (`coffer pki issue-agent {self.config.vm_id}`)",
            )
            return
        identity = identity_of_certificate(pem.cert)
        if identity != Identity("agent", self.config.vm_id):
            self.note(
                "identity",
                Verdict.FAIL,
                f"{tls.cert} is the certificate of {identity}, not of VM {self.config.vm_id!r}",
                f"issue one with `coffer pki issue-agent {self.config.vm_id}`",
            )
            return
        expires = x509.load_pem_x509_certificate(pem.cert).not_valid_after_utc
        days = (expires - datetime.now(UTC)).days
        if days < 0:
            self.note(
                "identity",
                Verdict.FAIL,
                f"the certificate expired on {expires:%Y-%m-%d}",
                f"issue a new one with `coffer pki issue-agent {self.config.vm_id}`",
            )
        elif days < CERT_WARN_DAYS:
            self.note(
                "identity",
                Verdict.WARN,
                f"the certificate expires in {days} days",
                f"issue a new one with `coffer pki issue-agent {self.config.vm_id}`",
            )
        else:
            self.note(
                "identity",
                Verdict.OK,
                f"agent {self.config.vm_id}, certificate valid until {expires:%Y-%m-%d}",
            )

    def displaced(self) -> None:
        """Whether another agent process with this VM's certificate took its session over."""
        check = "one agent per VM"
        record = Displacement.load(self.config.state_dir)
        fix = (
            "two agent processes use this VM's certificate (a cloned VM, or a second "
            "coffer-agent?): stop one of them, or give the other VM its own identity "
            "(`coffer pki issue-agent NEW-VM`)"
        )
        if record is None:
            self.note(check, Verdict.OK, "no other agent process took this VM's session over")
            return
        at = _iso(record.at)
        if record.resumed_at is None:
            self.note(
                check,
                Verdict.FAIL,
                f"{DuplicateAgent.code}: since {at} another agent process with this VM's "
                f"certificate ({record.other()}) has the session; this agent waits for it "
                "to end",
                fix,
            )
        elif time.time() - record.resumed_at < DISPLACED_WARN_SECONDS:
            self.note(
                check,
                Verdict.WARN,
                f"{DuplicateAgent.code}: at {at} another agent process with this VM's "
                f"certificate ({record.other()}) took the session over; this agent had it "
                f"again at {_iso(record.resumed_at)}",
                fix,
            )
        else:
            self.note(
                check,
                Verdict.OK,
                f"the last time another agent process took this VM's session over was {at}",
            )

    async def controller(self) -> agent_pb2.CheckReply | None:
        address = self.config.controller
        try:
            channel = secure_channel(address, self.config.tls, self.config.controller_name)
        except CofferError:
            return None  # the identity check said why
        async with channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            sent = time.time()
            try:
                reply: agent_pb2.CheckReply = await stub.Check(
                    agent_pb2.CheckRequest(), timeout=TIMEOUT_SECONDS
                )
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
                self.note(
                    "controller",
                    Verdict.FAIL,
                    f"no answer from {address} over mutual TLS: {code.name if code else ''} "
                    f"{exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc}",
                    "check `controller` in the config, that coffer-controller runs, that the "
                    "network and firewall let this VM reach it, and that its certificate is "
                    "from the same CA as this agent's",
                )
                return None
        self._round_trip = (sent, time.time())
        self.note(
            "controller", Verdict.OK, f"{address} answers (controller {reply.controller_version})"
        )
        return reply

    def clock(self, reply: agent_pb2.CheckReply) -> None:
        sent, received = self._round_trip
        skew = (sent + received) / 2 - reply.server_time
        found = (
            f"this VM's clock is {abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'} "
            "the controller's"
        )
        if abs(skew) >= SKEW_FAIL_SECONDS:
            self.note(
                "clock",
                Verdict.FAIL,
                found,
                "run NTP (chrony or systemd-timesyncd) on "
                "the VM and the controller: certificates and schedules depend on time",
            )
        elif abs(skew) >= SKEW_WARN_SECONDS:
            self.note("clock", Verdict.WARN, found, "run NTP on the VM and the controller")
        else:
            self.note("clock", Verdict.OK, found)

    def broker(self, reply: agent_pb2.CheckReply) -> None:
        if not reply.mqtt_host:
            self.note(
                "broker",
                Verdict.WARN,
                "the controller names no MQTT broker: no live status (backups still work)",
                "configure [mqtt] on the controller, or let it run its private broker",
            )
            return
        where = f"{reply.mqtt_host}:{reply.mqtt_port}"
        try:
            context = mqtt_ssl_context(self.config.tls)
            with (
                socket.create_connection(
                    (reply.mqtt_host, reply.mqtt_port), timeout=TIMEOUT_SECONDS
                ) as raw,
                context.wrap_socket(raw, server_hostname=reply.mqtt_host),
            ):
                pass
        except (OSError, ssl.SSLError, CofferError) as exc:
            self.note(
                "broker",
                Verdict.WARN,
                f"cannot reach the broker at {where} with TLS: {exc}",
                "let this VM reach the broker's port (backups work without "
                "it, but no presence or progress is published)",
            )
            return
        self.note("broker", Verdict.OK, f"{where} accepts this agent's certificate")

    def registration(self, reply: agent_pb2.CheckReply) -> None:
        if not reply.vault:
            self.note(
                "protection",
                Verdict.WARN,
                "this VM is not registered to any vault",
                "an operator registers it with a vault of its region "
                f"{self.config.region!r} (`coffer vault list` shows them): `coffer register "
                f"--vault VAULT {self.config.vm_id}`, then `coffer protect`",
            )
            return
        found = f"vault {reply.vault}, {reply.item_state}"
        if reply.policy:
            found += f", policy {reply.policy}"
        found += (
            "; an agent of this VM is connected"
            if reply.session_open
            else "; no agent of this VM is connected now"
        )
        self.note(
            "protection",
            Verdict.OK if reply.session_open else Verdict.WARN,
            found,
            "" if reply.session_open else "start coffer-agent (`coffer-agent --config FILE`)",
        )

    # --- disks -----------------------------------------------------------------------------

    def disks(self) -> None:
        if not self.config.disks:
            self.note(
                "disks",
                Verdict.FAIL,
                "no [[disks]] in the config",
                "add the VM's disks (name and path) to the agent config",
            )
            return
        table = mounts()
        for disk in self.config.disks:
            check = f"disk {disk.name}"
            try:
                with disk.path.open("rb") as f:
                    size = f.seek(0, os.SEEK_END)
            except OSError as exc:
                self.note(
                    check,
                    Verdict.FAIL,
                    f"cannot read {disk.path}: {exc.strerror}",
                    "fix `path` of the disk in the config, or run the agent as root",
                )
                continue
            self.note(check, Verdict.OK, f"{disk.path}, {size / (1 << 30):.2f} GiB, readable")
            self._mounts(disk.name, disk.path, table)
            self._provider(disk.name, disk.path, size)

    def _mounts(self, name: str, path: Path, table: list[Mount]) -> None:
        check = f"disk {name}: freeze"
        found = mounts_on_disk(path, table)
        if not found and in_use_unseen(path, table):
            self.note(
                check,
                Verdict.WARN,
                "the disk is in use but none of its file systems is mounted here (another "
                "mount namespace?): backups of it are only crash-consistent",
                "run coffer-agent inside the VM, where the disk is mounted",
            )
            return
        if not found:
            self.note(
                check,
                Verdict.OK,
                "no file system of this disk is mounted here: nothing to flush or freeze",
            )
            return
        if not self.config.consistency.freeze:
            self.note(
                check,
                Verdict.WARN,
                "freezing is turned off: backups are crash-consistent",
                "set `freeze = true` in [consistency]",
            )
            return
        for mount in found:
            where = f"{mount.mountpoint} ({mount.fstype})"
            if mount.network:
                self.note(
                    check,
                    Verdict.WARN,
                    f"{where} is a network file system: skipped, the disk is crash-consistent",
                    "nothing to do on this VM; back up the server's disks instead",
                )
            elif mount.fstype not in FREEZABLE:
                self.note(
                    check,
                    Verdict.WARN,
                    f"{where} cannot be frozen (FIFREEZE is not "
                    "supported): the disk is crash-consistent",
                    "use ext4, XFS or btrfs for data that must be consistent",
                )
            else:
                self.note(check, Verdict.OK, f"{where} can be frozen")

    def _provider(self, name: str, path: Path, size: int) -> None:
        check = f"disk {name}: snapshot"
        try:
            provider, refused = choose(name, path, self.config.consistency.order_for(name))
        except CofferError as exc:
            self.note(check, Verdict.FAIL, str(exc), "see the message")
            return
        why_not = "; ".join(f"not {p}: {why}" for p, why in refused.items())
        if provider.atomic:
            found = f"{provider.name}" + (f" ({why_not})" if why_not else "")
            self.note(check, Verdict.OK, found)
            free = _free_bytes(path.parent)
            if free is not None and free < size // 10:
                self.note(
                    f"disk {name}: space",
                    Verdict.WARN,
                    f"{free >> 20} MiB free beside "
                    "the image: writes during a backup copy blocks of the clone",
                    "keep at least a tenth of the disk's size free",
                )
        else:
            self.note(
                check,
                Verdict.WARN,
                f"{provider.name}: the file systems stay frozen "
                f"while the disk is read, up to {self.config.consistency.thaw_deadline:g} s"
                + (f" ({why_not})" if why_not else ""),
                "put the disk image on XFS "
                "(mkfs.xfs -m reflink=1) or btrfs so it can be cloned in an instant",
            )

    # --- scripts and directories -----------------------------------------------------------

    def scripts(self) -> None:
        policy = self.config.consistency
        for phase, script in (
            ("pre-script", policy.pre_script),
            ("post-script", policy.post_script),
        ):
            if script is None:
                continue
            problem = check_script(script)
            if problem:
                self.note(
                    phase,
                    Verdict.FAIL,
                    f"{script.path} {problem}",
                    "make it owned by root, executable, and writable by root only",
                )
            else:
                self.note(phase, Verdict.OK, f"{script.path}, timeout {script.timeout:g} s")

    def directories(self) -> None:
        state = self.config.state_dir
        free = _free_bytes(state if state.exists() else state.parent)
        if free is None:
            self.note(
                "state directory",
                Verdict.FAIL,
                f"{state} is not reachable",
                "create it, or fix `state_dir`",
            )
        else:
            self.note("state directory", Verdict.OK, f"{state}, {free >> 20} MiB free")
        for directory in self.config.restore_dirs:
            if not directory.is_dir():
                self.note(
                    "restore directory",
                    Verdict.WARN,
                    f"{directory} does not exist",
                    "create it: restores can only write there",
                )


CAP_SYS_ADMIN = 21


def _has_cap_sys_admin() -> bool:
    """Whether this process's effective capabilities include CAP_SYS_ADMIN (FIFREEZE needs it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _free_bytes(path: Path) -> int | None:
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def print_findings(findings: list[Finding]) -> None:
    width = max(len(f.check) for f in findings)
    marks = {Verdict.OK: "ok  ", Verdict.WARN: "WARN", Verdict.FAIL: "FAIL"}
    for finding in findings:
        print(f"{marks[finding.verdict]}  {finding.check.ljust(width)}  {finding.found}")
        if finding.fix:
            print(f"      {' ' * width}  fix: {finding.fix}")
    failed = sum(f.verdict is Verdict.FAIL for f in findings)
    warned = sum(f.verdict is Verdict.WARN for f in findings)
    print(f"\n{failed} to fix, {warned} to look at." if failed or warned else "\nAll good.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coffer-agent doctor", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="the agent's TOML config")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    args = parser.parse_args(argv)
    try:
        config = AgentConfig.load(args.config)
    except ConfigInvalid as exc:
        # The agent would refuse to start: each problem is a failed check, and nothing else
        # can be checked without a config.
        findings = [
            Finding("config", Verdict.FAIL, problem, f"edit {args.config}")
            for problem in exc.problems
        ]
    else:
        findings = [Finding("config", Verdict.OK, f"{args.config} is valid")]
        findings += asyncio.run(Doctor(config).run())
    if args.json:
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        print_findings(findings)
    return 1 if any(f.verdict is Verdict.FAIL for f in findings) else 0
