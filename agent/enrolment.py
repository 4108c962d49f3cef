"""`coffer-agent enrol`: this VM gets its certificate with a one-time token; its key stays here.

    coffer-agent enrol --controller HOST:PORT --token TOKEN [--config FILE | --tls-dir DIR]

1. The token (`shared/enrolment.py`) names the VM and pins the controller CA by its SHA-256
   fingerprint. With `--config`, the agent config's `vm_id` must be the token's VM and its
   `tls_dir` is where the certificate goes.
2. The agent has no CA yet, so it takes the one the enrolment listener sends in its TLS
   chain, and only if its fingerprint is the pinned one; nothing else of that first
   connection is trusted.
3. It makes its key (EC P-256) here and sends a certificate request with the token over TLS
   verified against that CA (the controller's name included), without a client certificate.
4. It checks the certificate it gets (its key, its VM, its CA) and writes `ca.crt`,
   `agent.crt` and `agent.key` (mode 0600, the directory 0700) into the TLS directory.

A bundle already there is not replaced without `--force` (enrolling again, e.g. after the VM's
certificate was revoked). The token may also come from the environment (`COFFER_ENROL_TOKEN`),
which keeps it out of the process list.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import socket
import ssl
import sys
from pathlib import Path
from typing import Any, Final

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import AgentConfig
from shared.address import parse_address
from shared.enrolment import EnrolmentToken
from shared.errors import (
    CofferError,
    Conflict,
    CorruptData,
    EnrolmentVmMismatch,
    InvalidArgument,
    Unauthenticated,
    Unavailable,
)
from shared.keyfiles import PRIVATE_DIR_MODE, PUBLIC_MODE, install_pair, write_file
from shared.rpc import enrolment_pb2, enrolment_pb2_grpc
from shared.rpc_channel import channel_options
from shared.rpc_errors import from_rpc_error
from shared.tls import (
    ORGANIZATION,
    ROLE_AGENT,
    Identity,
    TlsFiles,
    certificate_fingerprint,
    identity_of_certificate,
)

log = logging.getLogger(__name__)

DEFAULT_TLS_DIR: Final = Path("/etc/coffer-agent/tls")
TOKEN_ENV: Final = "COFFER_ENROL_TOKEN"
CALL_SECONDS: Final = 30.0
CONNECT_SECONDS: Final = 10.0


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def certificate_request(vm_id: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PKCS#10 request for the agent of `vm_id`, signed with `key`."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ROLE_AGENT),
            x509.NameAttribute(NameOID.COMMON_NAME, vm_id),
        ]
    )
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def check_issued(
    certificate_pem: bytes, ca_pem: bytes, key: ec.EllipticCurvePrivateKey, vm_id: str
) -> None:
    """CorruptData unless `certificate_pem` is the agent of `vm_id`'s, for `key`, from `ca_pem`."""
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
        authority = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise CorruptData(what="the controller's reply", detail=str(exc)) from exc
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if certificate.public_key().public_bytes(der, public) != key.public_key().public_bytes(
        der, public
    ):
        raise CorruptData(
            what="the controller's reply", detail="the certificate is for another key"
        )
    if identity_of_certificate(certificate_pem) != Identity(ROLE_AGENT, vm_id):
        raise CorruptData(
            what="the controller's reply", detail=f"the certificate is not VM {vm_id!r}'s"
        )
    try:
        certificate.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CorruptData(
            what="the controller's reply", detail="the certificate was not issued by its CA"
        ) from exc


# --- the pinned CA -------------------------------------------------------------------------


def _server_hostname(host: str, server_name: str | None) -> str | None:
    if server_name:
        return server_name
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None  # no SNI for an IP address


def _unverified_chain(tls: ssl.SSLSocket) -> list[bytes]:
    """The DER certificates the server sent, unverified (Python 3.13 has this public)."""
    public = getattr(tls, "get_unverified_chain", None)
    if public is not None:
        return [bytes(der) for der in public()]
    import _ssl  # only Python < 3.13 needs it

    chain: list[Any] = tls._sslobj.get_unverified_chain() or []  # type: ignore[attr-defined]
    return [certificate.public_bytes(_ssl.ENCODING_DER) for certificate in chain]


def pinned_ca(address: str, fingerprint: str, server_name: str | None = None) -> bytes:
    """The PEM CA certificate the enrolment listener at `address` sends whose SHA-256 is
    `fingerprint`; Unauthenticated if it sends none (it is not our controller)."""
    try:
        parsed = parse_address(address)
    except ValueError as exc:
        raise InvalidArgument(detail=f"--controller {address!r}: {exc}") from None
    # Nothing this connection says is trusted but a certificate matching the pin.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((parsed.host, parsed.port), timeout=CONNECT_SECONDS) as raw,
            context.wrap_socket(
                raw, server_hostname=_server_hostname(parsed.host, server_name)
            ) as tls,
        ):
            chain = _unverified_chain(tls)
    except OSError as exc:
        raise Unavailable(
            f"cannot reach the controller's enrolment listener at {address}: {exc}"
        ) from exc
    for der in chain:
        if certificate_fingerprint(der) == fingerprint:
            return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    raise Unauthenticated(
        detail=f"the server at {address} does not present the CA the token pins "
        f"(SHA-256 {fingerprint}): it is not the controller that made the token, or not its "
        "enrolment listener (`enrol_listen`)"
    )


# --- enrolling -----------------------------------------------------------------------------


async def enrol(
    address: str,
    token_text: str,
    tls_dir: Path,
    *,
    vm_id: str | None = None,
    server_name: str | None = None,
    force: bool = False,
) -> Identity:
    """Enrol with the controller's enrolment listener at `address`; the identity enrolled."""
    token = EnrolmentToken.parse(token_text)
    if vm_id is not None and vm_id != token.vm_id:
        raise EnrolmentVmMismatch(what="The agent config", given=vm_id, vm_id=token.vm_id)
    files = TlsFiles.in_dir(tls_dir, "agent")
    present = [p.name for p in (files.cert, files.key) if p.exists()]
    if present and not force:
        raise Conflict(
            detail=f"{tls_dir} already holds this agent's certificate ({', '.join(present)}); "
            "enrolling replaces it: give --force to do so"
        )
    ca_pem = await asyncio.to_thread(pinned_ca, address, token.ca_fingerprint, server_name)
    key = await asyncio.to_thread(new_key)
    request = enrolment_pb2.EnrolRequest(
        token=str(token), csr_pem=certificate_request(token.vm_id, key).decode()
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    async with grpc.aio.secure_channel(
        address, credentials, options=channel_options(server_name)
    ) as channel:
        try:
            reply = await enrolment_pb2_grpc.EnrolmentServiceStub(channel).Enrol(
                request, timeout=CALL_SECONDS
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
    certificate_pem = reply.certificate_pem.encode()
    issued_ca = reply.ca_pem.encode()
    if (
        certificate_fingerprint(
            x509.load_pem_x509_certificate(issued_ca).public_bytes(serialization.Encoding.DER)
        )
        != token.ca_fingerprint
    ):
        raise CorruptData(what="the controller's reply", detail="its CA is not the pinned one")
    check_issued(certificate_pem, issued_ca, key, token.vm_id)
    await asyncio.to_thread(_install, files, issued_ca, certificate_pem, key_pem(key))
    return Identity(ROLE_AGENT, token.vm_id)


def _install(files: TlsFiles, ca_pem: bytes, certificate_pem: bytes, key: bytes) -> None:
    files.cert.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(files.cert.parent, PRIVATE_DIR_MODE)
    write_file(files.ca, ca_pem, mode=PUBLIC_MODE)
    install_pair(files.cert, files.key, certificate_pem, key)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="coffer-agent enrol", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument(
        "--controller", required=True, help="the controller's enrolment listener, host:port"
    )
    parser.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV), help=f"the token (or env {TOKEN_ENV})"
    )
    parser.add_argument("--config", type=Path, help="the agent config (its vm_id and tls_dir)")
    parser.add_argument(
        "--tls-dir", type=Path, help=f"where to write the certificate (default {DEFAULT_TLS_DIR})"
    )
    parser.add_argument("--server-name", help="the controller's name in its certificate")
    parser.add_argument("--force", action="store_true", help="replace a certificate already there")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        if not args.token:
            raise InvalidArgument(detail=f"give the token with --token or in {TOKEN_ENV}")
        vm_id: str | None = None
        tls_dir: Path = args.tls_dir or DEFAULT_TLS_DIR
        server_name: str | None = args.server_name
        if args.config is not None:
            config = AgentConfig.load(args.config)
            vm_id = config.vm_id
            tls_dir = args.tls_dir or config.tls_dir
            server_name = server_name or config.controller_name
        identity = asyncio.run(
            enrol(
                args.controller,
                args.token,
                tls_dir,
                vm_id=vm_id,
                server_name=server_name,
                force=args.force,
            )
        )
    except CofferError as exc:
        print(f"coffer-agent enrol: {exc} ({exc.code})", file=sys.stderr)
        return exc.exit_code
    print(f"Enrolled as {identity}: certificate and key in {tls_dir} (the key never left here).")
    return 0
