"""Mutual TLS: who a certificate says its holder is, and the credentials gRPC and MQTT use.

The identity model every Coffer certificate follows (the controller CA issues them, see
`controller/pki.py`):

- Subject `O=Coffer, OU=<role>, CN=<name>`, role one of `controller`, `agent`, `operator`;
- an agent's name is its VM id (`validate_vm_id`), the controller's is `coffer-controller`,
  an operator's is a short lower-case name (`validate_operator_name`);
- a SAN URI `coffer://<role>/<name>` on every leaf certificate.

The TLS layer (gRPC's, or OpenSSL's for MQTT) verifies the chain to the one controller CA; this
module then reads the identity out of the already-verified peer certificate. It never decides
what an identity may do: the services do that with the `Identity` they get here.
"""

from __future__ import annotations

import functools
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from shared.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated

ORGANIZATION: Final = "Coffer"
ROLE_CONTROLLER: Final = "controller"
ROLE_AGENT: Final = "agent"
ROLE_OPERATOR: Final = "operator"
ROLES: Final = frozenset({ROLE_CONTROLLER, ROLE_AGENT, ROLE_OPERATOR})
CONTROLLER_NAME: Final = "coffer-controller"
# Names starting with this are Coffer's own (the controller); no VM may take one.
RESERVED_PREFIX: Final = "coffer-"

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


@functools.lru_cache(maxsize=1024)
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


def _peer_certificate(auth_context: Mapping[str, Iterable[bytes]]) -> bytes:
    for pem in auth_context.get(_PEER_CERT_PROPERTY, ()):
        return pem
    raise Unauthenticated(detail="the connection presented no client certificate")


def peer_identity(context: grpc.aio.ServicerContext) -> Identity:
    """The identity of the caller of the RPC `context` belongs to (mutual TLS)."""
    return identity_of_certificate(_peer_certificate(context.auth_context()))


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
