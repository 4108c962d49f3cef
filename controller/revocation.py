"""Revocation: which certificates the controller still accepts, and ending the calls of the rest.

Every certificate the CA issued is in its ledger (`controller/pki.py`) and, with where it
stands, in the catalog (`certificates`). A certificate stops being accepted when

- an admin revokes its holder (`RevokeCertificates`, `coffer pki revoke NAME`): every
  certificate the ledger has for that name, at once; a certificate issued afterwards (a VM
  enrolled again) is a new one and is accepted;
- it is superseded: a newer certificate of the same identity (same kind and name) is used for
  the first time, or is issued at enrolment (a VM enrolled again), or the controller renewed
  its own. Superseding on first use, not on issue, is what makes renewal safe: an agent whose
  renewal reply was lost still holds a certificate that works.

The gRPC edge asks `admit` on every call (a dictionary lookup; the ledger is read again only
for a certificate it does not know yet) and runs the call inside `live`, which ends it at once
with `CertificateRevoked` when its certificate is revoked while it runs: an agent's session
closes, a job watch stops. The broker learns it from the CRL (`ca.crl` in the pki directory,
Mosquitto's `crlfile`), rewritten on every change and at least daily, after which
`on_crl_changed` is called (the private broker reloads it).

Certificates issued before the ledger existed are recorded the first time they are used
("seen"); until then they cannot be revoked by name, since nothing knows their serials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from controller.catalog import Catalog, CertificateRecord
from controller.pki import Authority
from shared.clock import Clock
from shared.errors import CertificateRevoked, InvalidArgument, NotFound
from shared.tls import (
    CONTROLLER_NAME,
    ROLE_AGENT,
    CertificateFacts,
    Identity,
    certificate_facts,
)

log = logging.getLogger(__name__)

REVOKED = "revoked"
SUPERSEDED = "superseded"
# How a certificate came to be, as the ledger and the catalog record it.
ISSUED_OFFLINE = "pki"
ISSUED_AT_ENROLMENT = "enrolment"
ISSUED_AT_RENEWAL = "renewal"
ISSUED_BEFORE_LEDGER = "seen"


def status_of(record: CertificateRecord, now: float) -> str:
    """valid, revoked, superseded or expired."""
    if record.revoked_at is not None:
        return record.revoked_reason or REVOKED
    if record.not_after <= now:
        return "expired"
    return "valid"


def record_of(facts: CertificateFacts, issued_by: str) -> CertificateRecord:
    return CertificateRecord(
        serial=facts.serial_hex,
        kind=facts.identity.role,
        name=facts.identity.name,
        role=str(facts.operator_role or ""),
        fingerprint=facts.fingerprint,
        not_before=facts.not_before.timestamp(),
        not_after=facts.not_after.timestamp(),
        issued_by=issued_by,
    )


@dataclass(eq=False)
class _LiveCall:
    task: asyncio.Task[object]
    revoked: CertificateRevoked | None = None


@dataclass
class _Live:
    by_serial: dict[str, set[_LiveCall]] = field(default_factory=dict)

    def add(self, serial: str, call: _LiveCall) -> None:
        self.by_serial.setdefault(serial, set()).add(call)

    def remove(self, serial: str, call: _LiveCall) -> None:
        calls = self.by_serial.get(serial)
        if calls is not None:
            calls.discard(call)
            if not calls:
                del self.by_serial[serial]

    def end(self, record: CertificateRecord, error: CertificateRevoked) -> int:
        """Cancel the calls of `record` (not the current one); how many."""
        current = asyncio.current_task()
        ended = 0
        for call in list(self.by_serial.get(record.serial, ())):
            if call.task is current or call.revoked is not None:
                continue
            call.revoked = error
            call.task.cancel()
            ended += 1
        return ended


class Revocations:
    """The controller's record of certificates and their revocation."""

    def __init__(self, catalog: Catalog, authority: Authority, clock: Clock) -> None:
        self._catalog = catalog
        self._authority = authority
        self._clock = clock
        self._records: dict[str, CertificateRecord] = {}
        self._live = _Live()
        self._lock = asyncio.Lock()
        self._crl_written_at: float | None = None
        # Called after every new CRL (the private broker reloads it).
        self.on_crl_changed: list[Callable[[], None]] = []

    async def start(self) -> None:
        """Read the ledger into the catalog and write a fresh CRL."""
        async with self._lock:
            # What the catalog has is not parsed again from the ledger's files.
            self._records = {r.serial: r for r in await self._catalog.certificates()}
            await self._sync()
        await self.write_crl()

    # --- what the edge asks ------------------------------------------------------------------

    async def admit(self, pem: bytes) -> CertificateFacts:
        """The facts of the caller's certificate if it is still accepted; CertificateRevoked
        if not. Its first use supersedes the older certificates of its identity."""
        facts = certificate_facts(pem)
        record = self._records.get(facts.serial_hex)
        if record is not None and record.revoked_at is not None:
            raise self._refusal(record)
        if record is None or record.first_used_at is None:
            async with self._lock:
                record = await self._first_use(facts, pem)
        if record.revoked_at is not None:
            raise self._refusal(record)
        return facts

    @contextlib.asynccontextmanager
    async def live(self, facts: CertificateFacts) -> AsyncIterator[None]:
        """Run a call of the certificate `facts`: revoking it ends the call with
        CertificateRevoked."""
        task = asyncio.current_task()
        assert task is not None
        call = _LiveCall(task)
        self._live.add(facts.serial_hex, call)
        try:
            yield
        except asyncio.CancelledError:
            if call.revoked is None:
                raise
            task.uncancel()
            raise call.revoked from None
        finally:
            self._live.remove(facts.serial_hex, call)

    # --- revoking ----------------------------------------------------------------------------

    async def revoke(self, name: str, by: str) -> list[CertificateRecord]:
        """Revoke every certificate of agent or operator `name`; the ones revoked now."""
        if name == CONTROLLER_NAME:
            raise InvalidArgument(
                detail=f"{CONTROLLER_NAME!r} is the controller; its certificate is renewed, "
                "not revoked (a controller whose key was stolen needs a new CA)"
            )
        async with self._lock:
            await self._sync()
            held = [r for r in self._records.values() if r.name == name]
            if not held:
                raise NotFound(kind="certificate holder", name=name)
            now = self._clock.now()
            revoked = [r for r in held if r.revoked_at is None]
            await self._mark(revoked, now, REVOKED, by)
        await self.write_crl()
        return [self._records[r.serial] for r in revoked]

    async def issue(
        self, make: Callable[[], x509.Certificate], issued_by: str, *, supersedes: bool
    ) -> x509.Certificate:
        """Issue a certificate with `make` (the CA's work, run in a thread; it puts it in the
        ledger) and record it; with `supersedes`, the older ones of its identity are revoked
        now."""
        async with self._lock:
            certificate = await asyncio.to_thread(make)
            facts = certificate_facts(certificate.public_bytes(Encoding.PEM))
            record = record_of(facts, issued_by)
            await self._catalog.insert_certificates([record])
            self._records[record.serial] = record
            changed = await self._supersede_older(record) if supersedes else False
        if changed:
            await self.write_crl()
        return certificate

    async def certificates(self, name: str = "") -> list[CertificateRecord]:
        """The ledger's certificates (of `name`), oldest first."""
        async with self._lock:
            await self._sync()
        return await self._catalog.certificates(name)

    async def write_crl(self) -> None:
        """Write the CRL (every revoked certificate not yet expired) and say so."""
        now = self._clock.now()
        revoked = [
            (int(r.serial, 16), datetime.fromtimestamp(r.revoked_at, UTC))
            for r in self._records.values()
            if r.revoked_at is not None and r.not_after > now
        ]
        await asyncio.to_thread(
            self._authority.write_crl, revoked, datetime.fromtimestamp(now, UTC)
        )
        self._crl_written_at = now
        for listener in self.on_crl_changed:
            listener()

    def status(self, record: CertificateRecord) -> str:
        """valid, revoked, superseded or expired, now."""
        return status_of(record, self._clock.now())

    @property
    def crl_written_at(self) -> float | None:
        return self._crl_written_at

    # --- inside the lock ---------------------------------------------------------------------

    async def _sync(self) -> None:
        """Read what the ledger gained into the catalog and memory."""
        ledger = await asyncio.to_thread(self._authority.ledger, frozenset(self._records))
        new = [
            record_of(facts, ISSUED_OFFLINE)
            for serial, facts in ledger.items()
            if serial not in self._records
        ]
        if new or not self._records:
            await self._catalog.insert_certificates(new)
            self._records = {r.serial: r for r in await self._catalog.certificates()}

    async def _first_use(self, facts: CertificateFacts, pem: bytes) -> CertificateRecord:
        record = self._records.get(facts.serial_hex)
        if record is None:
            await self._sync()
            record = self._records.get(facts.serial_hex)
        if record is None:
            # Issued by our CA (TLS checked that) before there was a ledger: record it now,
            # so that it can be revoked by name from here on.
            certificate = x509.load_pem_x509_certificate(pem)
            await asyncio.to_thread(self._authority.record, certificate)
            record = record_of(facts, ISSUED_BEFORE_LEDGER)
            await self._catalog.insert_certificates([record])
            self._records[record.serial] = record
            log.warning(
                "%s uses a certificate issued before the ledger (serial %s); recorded now",
                facts.identity,
                record.serial,
            )
        if record.first_used_at is not None or record.revoked_at is not None:
            return record
        now = self._clock.now()
        newer_in_use = [
            r
            for r in self._holders(record)
            if r.not_before > record.not_before and r.first_used_at is not None
        ]
        if newer_in_use:
            # A newer certificate of this identity is in use: this one was replaced.
            await self._mark([record], now, SUPERSEDED, f"serial {newer_in_use[-1].serial}")
            await self.write_crl()
            return self._records[record.serial]
        await self._catalog.certificate_used(record.serial, now)
        record = replace(record, first_used_at=now)
        self._records[record.serial] = record
        if await self._supersede_older(record):
            await self.write_crl()
        return record

    def _holders(self, record: CertificateRecord) -> list[CertificateRecord]:
        """The other certificates of `record`'s identity, oldest first."""
        return sorted(
            (
                r
                for r in self._records.values()
                if r.kind == record.kind and r.name == record.name and r.serial != record.serial
            ),
            key=lambda r: r.not_before,
        )

    async def _supersede_older(self, record: CertificateRecord) -> bool:
        """Revoke the certificates of `record`'s identity older than it; whether any were.

        Validity starts are whole seconds: of two issued within one second, the one used (or
        issued at enrolment) later is taken as the newer."""
        older = [
            r
            for r in self._holders(record)
            if r.not_before <= record.not_before and r.revoked_at is None
        ]
        await self._mark(older, self._clock.now(), SUPERSEDED, f"serial {record.serial}")
        return bool(older)

    async def _mark(
        self, records: Sequence[CertificateRecord], at: float, reason: str, by: str
    ) -> None:
        if not records:
            return
        await self._catalog.revoke_certificates([r.serial for r in records], at, reason, by)
        for record in records:
            revoked = replace(record, revoked_at=at, revoked_reason=reason, revoked_by=by)
            self._records[record.serial] = revoked
            ended = self._live.end(revoked, self._refusal(revoked))
            log.warning(
                "certificate %s of %s %s is %s (by %s)%s",
                record.serial,
                record.kind,
                record.name,
                reason,
                by,
                f"; {ended} call(s) of it ended" if ended else "",
            )

    @staticmethod
    def _refusal(record: CertificateRecord) -> CertificateRevoked:
        at = datetime.fromtimestamp(record.revoked_at or 0, UTC).isoformat(timespec="seconds")
        identity = Identity(record.kind, record.name)
        if record.revoked_reason == SUPERSEDED:
            how = (
                f"superseded at {at} by a newer certificate of the same identity "
                f"({record.revoked_by})"
            )
            fix = "Use the newer certificate."
        else:
            how = f"revoked at {at} by {record.revoked_by or 'an admin'}"
            fix = (
                f"Enrol the VM again (`coffer enrol create --vm {record.name}`)."
                if record.kind == ROLE_AGENT
                else "Ask an admin for a new certificate."
            )
        return CertificateRevoked(identity=identity, serial=record.serial, reason=how, fix=fix)
