"""Mutual TLS: who a certificate says its holder is, and the credentials gRPC and MQTT use.

The identity model every Coffer certificate follows (the controller CA issues them, see
`controller/pki.py`):

- Subject `O=Coffer, OU=<role>, CN=<name>`, role one of `controller`, `agent`, `operator`;
- an agent's name is its VM id (`validate_vm_id`), the controller's is `coffer-controller`,
  an operator's is a short lower-case name (`validate_operator_name`);
- an operator's certificate also carries its operator role (`OperatorRole`: reader, operator,
  admin) in the subject's `title` attribute; one issued before roles existed has none;
- a SAN URI `coffer://<role>/<name>` on every leaf certificate.

A CN names one identity only: the controller's `coffer-controller` no VM or operator may take,
no VM id starts with `coffer-`, and the CA never issues an operator and an agent one name
(`controller/pki.py` checks its ledger of issued certificates). Mosquitto sees nothing but the
CN (its MQTT user name), so this is what lets the broker's ACLs tell identities apart.

The TLS layer (gRPC's, or OpenSSL's for MQTT) verifies the chain to the one controller CA; this
module then reads the identity out of the already-verified peer certificate. It never decides
what an identity may do: the services do that with the `Identity` they get here.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, NamedTuple

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from shared.errors import (
    InvalidArgument,
    NameReserved,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)

ORGANIZATION: Final = "Coffer"
ROLE_CONTROLLER: Final = "controller"
ROLE_AGENT: Final = "agent"
ROLE_OPERATOR: Final = "operator"
ROLES: Final = frozenset({ROLE_CONTROLLER, ROLE_AGENT, ROLE_OPERATOR})
CONTROLLER_NAME: Final = "coffer-controller"
# Names starting with this are Coffer's own (the controller); no VM or operator may take one.
RESERVED_PREFIX: Final = "coffer-"
# The subject attribute an operator certificate carries its operator role in.
ROLE_ATTRIBUTE: Final = NameOID.TITLE
# Certificates start this much before they are issued, so a peer whose clock is slightly
# behind accepts them; a certificate's issue time is its start plus this.
BACKDATE: Final = timedelta(minutes=5)
# A certificate is renewed once this fraction of its life (from its issue) has passed.
RENEW_AFTER: Final = 2 / 3

_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")

# The key gRPC core puts the peer's leaf certificate under in the auth context.
_PEER_CERT_PROPERTY = "x509_pem_cert"

# --- names ---------------------------------------------------------------------------------


def validate_vm_id(vm_id: str) -> str:
    """`vm_id` if it is a valid VM id (the CN of its agent's certificate); else InvalidArgument."""
    if not _NAME_PATTERN.fullmatch(vm_id):
        raise InvalidArgument(
            detail=f"VM id {vm_id!r} must be 1-63 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if vm_id.startswith(RESERVED_PREFIX):
        raise InvalidArgument(
            detail=f"VM id {vm_id!r} starts with {RESERVED_PREFIX!r}, which is reserved"
        )
    return vm_id


def validate_operator_name(name: str) -> str:
    """`name` if it is a valid operator name (the CN of an operator certificate)."""
    if not _NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            detail=f"operator name {name!r} must be 1-63 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def validate_new_operator_name(name: str) -> str:
    """`name` if a new operator may be given it: valid, and not Coffer's own (`coffer-...`).

    Whether an agent holds it is for the issuer to check (its ledger, `controller/pki.py`).
    """
    validate_operator_name(name)
    if name == CONTROLLER_NAME or name.startswith(RESERVED_PREFIX):
        raise NameReserved(
            name=name,
            wanted="an operator",
            why=f"names starting with {RESERVED_PREFIX!r} are Coffer's own "
            f"({CONTROLLER_NAME!r} is the controller's, on MQTT too)",
        )
    return name


# --- operator roles ------------------------------------------------------------------------


class OperatorRole(enum.StrEnum):
    """What an operator may do, each role all that the one before it may and more.

    reader: lists, dashboard, job views; operator: also backups, restores, files, verify,
    cancel; admin: also vaults, policies, protection, deletes, PKI, enrolment, keys, audit.
    """

    READER = "reader"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(OperatorRole).index(self)

    def allows(self, needed: OperatorRole) -> bool:
        """This role may do what `needed` may."""
        return self.rank >= needed.rank


# --- identity ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Who a verified certificate names: its role and its name (for an agent, the VM id)."""

    role: str
    name: str

    @property
    def uri(self) -> str:
        """The SAN URI that names this identity in its certificate."""
        return f"coffer://{self.role}/{self.name}"

    def __str__(self) -> str:
        return f"{self.role}/{self.name}"


def _single_attribute(subject: x509.Name, oid: x509.ObjectIdentifier, label: str) -> str:
    values = subject.get_attributes_for_oid(oid)
    if len(values) != 1:
        raise Unauthenticated(
            detail=f"certificate subject {subject.rfc4514_string()!r} needs exactly one {label}"
        )
    value = values[0].value
    return value if isinstance(value, str) else value.decode()


@functools.lru_cache(maxsize=16384)  # as certificate_facts
def identity_of_certificate(pem: bytes) -> Identity:
    """The Coffer identity in a PEM certificate's subject; Unauthenticated if it has none.

    Does not verify the certificate: the TLS handshake did that. Results are cached by the PEM
    bytes because every RPC of a connection presents the same certificate.
    """
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise Unauthenticated(detail=f"the peer certificate cannot be parsed ({e})") from e
    subject = certificate.subject
    if _single_attribute(subject, NameOID.ORGANIZATION_NAME, "organization (O)") != ORGANIZATION:
        raise Unauthenticated(detail=f"{subject.rfc4514_string()!r} is not a Coffer certificate")
    role = _single_attribute(subject, NameOID.ORGANIZATIONAL_UNIT_NAME, "role (OU)")
    name = _single_attribute(subject, NameOID.COMMON_NAME, "name (CN)")
    try:
        if role == ROLE_AGENT:
            validate_vm_id(name)
        elif role == ROLE_OPERATOR:
            validate_operator_name(name)
        elif role == ROLE_CONTROLLER:
            if name != CONTROLLER_NAME:
                raise InvalidArgument(detail=f"the controller is named {CONTROLLER_NAME!r}")
        else:
            raise InvalidArgument(detail=f"role {role!r} is not one of {', '.join(sorted(ROLES))}")
    except InvalidArgument as e:
        raise Unauthenticated(detail=f"certificate {subject.rfc4514_string()!r}: {e}") from e
    return Identity(role=role, name=name)


@dataclass(frozen=True)
class CertificateFacts:
    """What the controller needs of a verified certificate: who, which one, and when valid."""

    identity: Identity
    serial: int
    fingerprint: str
    """SHA-256 of the certificate's DER bytes, lower-case hex."""
    not_before: datetime
    not_after: datetime
    operator_role: OperatorRole | None = None
    """An operator certificate's role; None for others and for one issued before roles."""

    @property
    def serial_hex(self) -> str:
        return serial_hex(self.serial)

    @property
    def renewal_due(self) -> datetime:
        return renewal_due(self.not_before, self.not_after)


def serial_hex(serial: int) -> str:
    """A certificate serial number as Coffer writes it (lower-case hex, as in the ledger)."""
    return f"{serial:x}"


def certificate_fingerprint(der: bytes) -> str:
    """The SHA-256 fingerprint of a certificate's DER bytes, lower-case hex."""
    return hashlib.sha256(der).hexdigest()


def renewal_due(not_before: datetime, not_after: datetime) -> datetime:
    """When a certificate valid from `not_before` to `not_after` is to be renewed.

    Its life is counted from its issue (`not_before` + `BACKDATE`), so the backdating does not
    make a short-lived certificate due the moment it is issued.
    """
    issued = min(not_before + BACKDATE, not_after)
    return issued + (not_after - issued) * RENEW_AFTER


def facts_of(certificate: x509.Certificate) -> CertificateFacts:
    """The facts of a parsed certificate; Unauthenticated if it names no Coffer identity."""
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    return certificate_facts(pem)


# Sized for the design fleet (10,000 agents, each call of each agent asks): at 1,024 a fleet
# of thousands missed it on nearly every call, a certificate parse each (issue 13). An entry
# is a PEM and its facts, about 1.5 KiB.
@functools.lru_cache(maxsize=16384)
def certificate_facts(pem: bytes) -> CertificateFacts:
    """The identity, serial, fingerprint, validity and operator role of a PEM certificate.

    Does not verify it (the TLS handshake did); cached by the PEM bytes like
    `identity_of_certificate`.
    """
    identity = identity_of_certificate(pem)
    certificate = x509.load_pem_x509_certificate(pem)
    role: OperatorRole | None = None
    if identity.role == ROLE_OPERATOR:
        titles = certificate.subject.get_attributes_for_oid(ROLE_ATTRIBUTE)
        if len(titles) > 1:
            raise Unauthenticated(detail=f"operator certificate {identity.name!r} has two roles")
        if titles:
            value = titles[0].value
            text = value if isinstance(value, str) else value.decode()
            try:
                role = OperatorRole(text)
            except ValueError:
                raise Unauthenticated(
                    detail=f"operator certificate {identity.name!r} has the unknown role {text!r}"
                ) from None
    return CertificateFacts(
        identity=identity,
        serial=certificate.serial_number,
        fingerprint=certificate_fingerprint(certificate.public_bytes(serialization.Encoding.DER)),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        operator_role=role,
    )


def _peer_certificate(auth_context: Mapping[str, Iterable[bytes]]) -> bytes:
    for pem in auth_context.get(_PEER_CERT_PROPERTY, ()):
        return pem
    raise Unauthenticated(detail="the connection presented no client certificate")


def peer_identity(context: grpc.aio.ServicerContext) -> Identity:
    """The identity of the caller of the RPC `context` belongs to (mutual TLS)."""
    return identity_of_certificate(_peer_certificate(context.auth_context()))


def peer_certificate_pem(context: grpc.aio.ServicerContext) -> bytes:
    """The PEM certificate the caller of the RPC `context` belongs to presented."""
    return _peer_certificate(context.auth_context())


# --- files and credentials -----------------------------------------------------------------


class TlsPem(NamedTuple):
    """The PEM bytes of a TlsFiles triple."""

    ca: bytes
    cert: bytes
    key: bytes


@dataclass(frozen=True)
class TlsFiles:
    """Where one party's TLS material lives: the CA certificate, its certificate and its key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path, stem: str) -> TlsFiles:
        """`directory/ca.crt`, `directory/<stem>.crt`, `directory/<stem>.key` (pki layout)."""
        return cls(
            ca=directory / "ca.crt", cert=directory / f"{stem}.crt", key=directory / f"{stem}.key"
        )

    def read(self) -> TlsPem:
        """The three files' bytes, checked: certificates parse, the key is the certificate's."""
        ca, cert, key = (_read(self.ca), _read(self.cert), _read(self.key))
        ca_certificates = _parse_certificates(ca, self.ca)
        certificate = _parse_certificates(cert, self.cert)[0]
        try:
            private_key = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as e:
            raise InvalidArgument(detail=f"{self.key} is not an unencrypted PEM private key") from e
        if _public_der(private_key.public_key()) != _public_der(certificate.public_key()):
            raise InvalidArgument(
                detail=f"the key {self.key} does not belong to the certificate {self.cert}"
            )
        # A CA file may hold several CAs (e.g. while rotating); one must have issued ours.
        if all(certificate.issuer != authority.subject for authority in ca_certificates):
            raise InvalidArgument(detail=f"{self.cert} was not issued by the CA in {self.ca}")
        return TlsPem(ca=ca, cert=cert, key=key)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise NotFound(kind="TLS file", name=str(path)) from e
    except PermissionError as e:
        raise PermissionDenied(detail=f"cannot read {path}") from e


def _parse_certificates(pem: bytes, path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise InvalidArgument(detail=f"{path} is not a PEM certificate") from e


def _public_der(public_key: Any) -> bytes:
    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate issued by our CA."""
    pem = files.read()
    return grpc.ssl_server_credentials(
        [(pem.key, pem.cert)], root_certificates=pem.ca, require_client_auth=True
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Client credentials: present our certificate, trust only our CA for the server."""
    pem = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=pem.ca, private_key=pem.key, certificate_chain=pem.cert
    )


def mqtt_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """An SSL context for an MQTT client (aiomqtt `tls_context=`): our certificate, our CA only."""
    files.read()  # the same checks and errors as for gRPC, before OpenSSL's terser ones
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(files.cert), keyfile=str(files.key))
    return context
