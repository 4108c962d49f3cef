"""Enrolment and renewal: how an agent gets its certificate without its key leaving the VM.

Enrolment. An admin asks for a token (`coffer enrol create --vm NAME`): one use, for one VM,
expiring (an hour by default, 30 days at most), carrying the CA's fingerprint
(`shared/enrolment.py`); the catalog keeps only the SHA-256 of its secret and who made it.
The agent makes its key, and sends the token with a certificate request to the enrolment
listener (`enrol_listen`), which asks for no client certificate: TLS there authenticates the
controller only, and the agent checks it against the CA pinned by the token. The listener is
bounded (small messages, a few calls at a time) and checks the cheap things first: the token's
form, then its id (a lookup), its secret (one hash), its expiry and use; only then does it
parse the request, check its signature and that it names the token's VM, spend the token (a
conditional update: of two racing uses one wins) and issue. A VM enrolled again gets a new
certificate that supersedes its old ones at once. Every attempt with a real token's id is
audited, refused ones too.

Renewal. An agent renews over its mutual-TLS session (`AgentService.Renew`) with a request
for a new key; the new certificate supersedes the old one when first used (`revocation.py`),
so an agent whose reply was lost keeps a working one. At most one renewal per VM per third of
a certificate's life (an hour at most): each writes a certificate into the ledger.

Issued certificates live `certificate_days` (controller config).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from controller.audit import KIND_ENROLMENT, AuditLog
from controller.catalog import Catalog, EnrolmentTokenRecord
from controller.pki import Authority, check_name_free, public_key_of_request
from controller.revocation import ISSUED_AT_ENROLMENT, ISSUED_AT_RENEWAL, Revocations
from shared.clock import Clock
from shared.enrolment import EnrolmentToken, secret_matches
from shared.errors import (
    EnrolmentTokenExpired,
    EnrolmentTokenInvalid,
    EnrolmentTokenUsed,
    EnrolmentVmMismatch,
    InvalidArgument,
    PermissionDenied,
    RenewalTooSoon,
)
from shared.rpc import enrolment_pb2, enrolment_pb2_grpc
from shared.rpc_channel import server_options
from shared.tls import ROLE_AGENT, Identity, validate_vm_id

log = logging.getLogger(__name__)

DEFAULT_TOKEN_SECONDS: Final = 3600
MAX_TOKEN_SECONDS: Final = 30 * 24 * 3600
# A certificate request of an EC P-256 key is about 400 bytes.
MAX_REQUEST_BYTES: Final = 8 * 1024
# The enrolment listener's own limits: whole messages, and calls at once.
MAX_ENROL_MESSAGE_BYTES: Final = 16 * 1024
MAX_ENROL_CALLS: Final = 8
# An agent renews once per 2/3 of its certificate's life; more often than a third of it (or
# an hour) is refused, which bounds what one agent can add to the ledger.
MAX_RENEWAL_INTERVAL_SECONDS: Final = 3600.0


@dataclass(frozen=True)
class Issued:
    """A certificate for an agent, and the CA to trust."""

    certificate_pem: bytes
    ca_pem: bytes


class Enrolment:
    """Enrolment tokens, and certificates for agents' requests."""

    def __init__(
        self,
        catalog: Catalog,
        authority: Authority,
        revocations: Revocations,
        clock: Clock,
        lifetime: timedelta,
    ) -> None:
        self._catalog = catalog
        self._authority = authority
        self._revocations = revocations
        self._clock = clock
        self._lifetime = lifetime
        self._renewed: dict[str, float] = {}

    @property
    def ca_fingerprint(self) -> str:
        return self._authority.ca_fingerprint

    async def create_token(
        self, vm_id: str, expires_seconds: int, by: str
    ) -> tuple[EnrolmentToken, EnrolmentTokenRecord]:
        """A new token for VM `vm_id`, valid `expires_seconds` (0: an hour)."""
        validate_vm_id(vm_id)
        seconds = expires_seconds or DEFAULT_TOKEN_SECONDS
        if not 0 < seconds <= MAX_TOKEN_SECONDS:
            raise InvalidArgument(
                detail=f"a token may live at most {MAX_TOKEN_SECONDS // 86400} days, "
                f"not {seconds} seconds"
            )
        await self._name_free(vm_id)
        token = EnrolmentToken.new(vm_id, self._authority.ca_fingerprint)
        now = self._clock.now()
        record = EnrolmentTokenRecord(
            id=token.token_id,
            vm_id=vm_id,
            secret_sha256=token.secret_hash,
            created_at=now,
            created_by=by,
            expires_at=now + seconds,
        )
        await self._catalog.insert_enrolment_token(record)
        log.info("enrolment token %s for VM %s made by %s", token.token_id, vm_id, by)
        return token, record

    async def lookup(self, text: str) -> tuple[EnrolmentToken, EnrolmentTokenRecord | None]:
        """The token `text` and the record of its id (None: no token has it)."""
        token = EnrolmentToken.parse(text)
        return token, await self._catalog.enrolment_token(token.token_id)

    def check_token(self, token: EnrolmentToken, record: EnrolmentTokenRecord | None) -> None:
        """Nothing if `token` (whose record is `record`) may enrol now; else the refusal."""
        if record is None or not secret_matches(token.secret, record.secret_sha256):
            raise EnrolmentTokenInvalid(detail="no such token was made by this controller")
        if record.vm_id != token.vm_id:
            # The id and secret are right but the VM was edited: as good as forged.
            raise EnrolmentTokenInvalid(detail="it was altered")
        if record.used_at is not None:
            raise EnrolmentTokenUsed(vm_id=record.vm_id, used=_when(record.used_at))
        if record.expires_at <= self._clock.now():
            raise EnrolmentTokenExpired(vm_id=record.vm_id, expired=_when(record.expires_at))

    async def enrol(
        self, token: EnrolmentToken, record: EnrolmentTokenRecord, csr_pem: bytes, peer: str
    ) -> Issued:
        """Spend `token` (checked by `check_token`) on the certificate request `csr_pem`."""
        name, public_key = _request(csr_pem)
        if name != record.vm_id:
            raise EnrolmentVmMismatch(
                what="The certificate request", given=name, vm_id=record.vm_id
            )
        await self._name_free(record.vm_id)
        now = self._clock.now()
        if not await self._catalog.use_enrolment_token(record.id, now, peer):
            # Spent or expired since it was checked: say which, as the check would.
            self.check_token(token, await self._catalog.enrolment_token(record.id))
            raise EnrolmentTokenUsed(vm_id=record.vm_id, used=_when(now))
        identity = Identity(ROLE_AGENT, record.vm_id)
        certificate = await self._revocations.issue(
            lambda: self._authority.issue(identity, public_key, self._lifetime),
            ISSUED_AT_ENROLMENT,
            supersedes=True,
        )
        log.info(
            "VM %s enrolled from %s with token %s (certificate %s)",
            record.vm_id,
            peer,
            record.id,
            f"{certificate.serial_number:x}",
        )
        return Issued(certificate.public_bytes(Encoding.PEM), self._authority.ca_pem)

    async def renew(self, vm_id: str, csr_pem: bytes) -> Issued:
        """A new certificate for the agent of `vm_id`, for the key of `csr_pem`."""
        name, public_key = _request(csr_pem)
        if name != vm_id:
            raise PermissionDenied(
                detail=f"the agent of VM {vm_id!r} asked for a certificate for {name!r}"
            )
        now = self._clock.now()
        last = self._renewed.get(vm_id)
        interval = min(self._lifetime.total_seconds() / 3, MAX_RENEWAL_INTERVAL_SECONDS)
        if last is not None and now - last < interval:
            raise RenewalTooSoon(vm_id=vm_id, seconds=f"{interval:.0f}")
        self._renewed[vm_id] = now
        identity = Identity(ROLE_AGENT, vm_id)
        certificate = await self._revocations.issue(
            lambda: self._authority.issue(identity, public_key, self._lifetime),
            ISSUED_AT_RENEWAL,
            supersedes=False,
        )
        log.info("VM %s renewed its certificate (now %x)", vm_id, certificate.serial_number)
        return Issued(certificate.public_bytes(Encoding.PEM), self._authority.ca_pem)

    async def _name_free(self, vm_id: str) -> None:
        ledger = await asyncio.to_thread(self._authority.ledger)
        check_name_free(ledger.values(), Identity(ROLE_AGENT, vm_id))


def _request(csr_pem: bytes) -> tuple[str, ec.EllipticCurvePublicKey]:
    if len(csr_pem) > MAX_REQUEST_BYTES:
        raise InvalidArgument(
            detail=f"the certificate request is larger than {MAX_REQUEST_BYTES} bytes"
        )
    return public_key_of_request(csr_pem)


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


class EnrolmentService(enrolment_pb2_grpc.EnrolmentServiceServicer):
    """The enrolment listener's one RPC (no client certificate; the token is the proof)."""

    def __init__(self, enrolment: Enrolment, audit: AuditLog) -> None:
        self._enrolment = enrolment
        self._audit = audit

    async def Enrol(
        self, request: enrolment_pb2.EnrolRequest, context: grpc.aio.ServicerContext
    ) -> enrolment_pb2.EnrolReply:
        peer = context.peer()
        token, record = await self._enrolment.lookup(request.token)
        if record is None:
            # Not one of ours: refused without a write, so that noise costs next to nothing.
            log.warning("enrolment from %s refused: unknown token id %s", peer, token.token_id)
            self._enrolment.check_token(token, record)
        assert record is not None
        # The token and request are secrets or bulk: the log names the token and its VM.
        async with self._audit.call(
            who=f"token {record.id}",
            kind=KIND_ENROLMENT,
            method="Enrol",
            request={"vm_id": record.vm_id},
            peer=peer,
        ):
            self._enrolment.check_token(token, record)
            issued = await self._enrolment.enrol(
                token, record, request.csr_pem.encode(errors="replace"), peer
            )
        return enrolment_pb2.EnrolReply(
            certificate_pem=issued.certificate_pem.decode(), ca_pem=issued.ca_pem.decode()
        )


def enrol_server_options() -> list[tuple[str, Any]]:
    """The enrolment listener's gRPC options: the controller's, with small messages and few
    streams per connection, so that a caller without a certificate can make it hold little."""
    small = {
        "grpc.max_receive_message_length": MAX_ENROL_MESSAGE_BYTES,
        "grpc.max_send_message_length": MAX_ENROL_MESSAGE_BYTES,
        "grpc.max_concurrent_streams": 2,
    }
    return [(k, v) for k, v in server_options() if k not in small] + list(small.items())
