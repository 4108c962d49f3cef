"""The controller CA: creating it and issuing the controller, agent and operator certificates.

Only the controller host holds the CA key. Layout of a pki directory (`init_pki`):

    ca.crt, ca.key                  the CA (EC P-256, valid 10 years; never overwritten)
    controller.crt, controller.key  `coffer-controller`: serverAuth + clientAuth (it is also an
                                    MQTT client), SANs localhost, 127.0.0.1 and the given hosts
    operator.crt, operator.key      operator `admin`: clientAuth

`issue_agent` and `issue_operator` write a bundle (`ca.crt` plus the holder's certificate and
key) to hand to one agent or operator; they refuse to replace a bundle already there unless
forced, since the agent or operator using it would lose its key. Leaf certificates are valid
2 years. Subjects follow the identity model of `shared.tls`. Keys are written with mode 0600,
every file atomically (temporary file, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import Conflict, CorruptData, InvalidArgument, NotFound
from shared.tls import (
    CONTROLLER_NAME,
    ORGANIZATION,
    ROLE_AGENT,
    ROLE_CONTROLLER,
    ROLE_OPERATOR,
    Identity,
    validate_operator_name,
    validate_vm_id,
)

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
ADMIN_OPERATOR = "admin"
DEFAULT_CONTROLLER_HOSTS = ("localhost", "127.0.0.1")

CA_VALIDITY = timedelta(days=3652)
LEAF_VALIDITY = timedelta(days=730)
# Certificates start a little in the past so a peer whose clock is slightly behind accepts them.
BACKDATE = timedelta(minutes=5)

_KEY_MODE = 0o600
_CERT_MODE = 0o644
_DIR_MODE = 0o700
_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

_PrivateKey = ec.EllipticCurvePrivateKey


def init_pki(pki_dir: Path, *, hosts: Sequence[str] = ()) -> None:
    """Create a new CA in `pki_dir` with the controller's and operator `admin`'s certificates.

    Refuses (Conflict) when `pki_dir` already holds a CA: every certificate it issued would
    stop being trusted. `hosts` are extra DNS names or IP addresses the controller is reached at.
    """
    names = _server_names([*DEFAULT_CONTROLLER_HOSTS, *hosts])
    existing = [name for name in (CA_CERT, CA_KEY) if (pki_dir / name).exists()]
    if existing:
        raise _ca_exists(pki_dir, existing)
    pki_dir.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)

    ca_key = _new_key()
    ca_cert = _ca_certificate(ca_key)
    try:
        # Linked into place, never renamed over: two racing inits cannot both win.
        _write(pki_dir / CA_KEY, _key_pem(ca_key), mode=_KEY_MODE, replace=False)
        _write(pki_dir / CA_CERT, _cert_pem(ca_cert), mode=_CERT_MODE, replace=False)
    except FileExistsError as e:
        raise _ca_exists(pki_dir, [Path(e.filename2 or CA_KEY).name]) from e

    _issue(
        ca_cert, ca_key, Identity(ROLE_CONTROLLER, CONTROLLER_NAME), pki_dir, "controller", names
    )
    _issue(ca_cert, ca_key, Identity(ROLE_OPERATOR, ADMIN_OPERATOR), pki_dir, "operator")


def issue_agent(pki_dir: Path, vm_id: str, out_dir: Path, *, force: bool = False) -> None:
    """Write `ca.crt`, `agent.crt` and `agent.key` for the agent of VM `vm_id` to `out_dir`.

    Refuses (Conflict) to replace a bundle `out_dir` holds unless `force`."""
    identity = Identity(ROLE_AGENT, validate_vm_id(vm_id))
    ca_cert, ca_key = _load_ca(pki_dir)
    _write_bundle(ca_cert, ca_key, identity, out_dir, "agent", force=force)


def issue_operator(pki_dir: Path, name: str, out_dir: Path, *, force: bool = False) -> None:
    """Write `ca.crt`, `operator.crt` and `operator.key` for operator `name` to `out_dir`.

    Refuses (Conflict) to replace a bundle `out_dir` holds unless `force`."""
    identity = Identity(ROLE_OPERATOR, validate_operator_name(name))
    ca_cert, ca_key = _load_ca(pki_dir)
    _write_bundle(ca_cert, ca_key, identity, out_dir, "operator", force=force)


# --- certificates --------------------------------------------------------------------------


def _new_key() -> _PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ca_certificate(key: _PrivateKey) -> x509.Certificate:
    # A random suffix tells this installation's CA apart from any other Coffer CA by name.
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Coffer CA {secrets.token_hex(4)}"),
        ]
    )
    now = datetime.now(UTC)
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf_certificate(
    ca_cert: x509.Certificate,
    ca_key: _PrivateKey,
    identity: Identity,
    public_key: ec.EllipticCurvePublicKey,
    server_names: Sequence[x509.GeneralName],
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role),
            x509.NameAttribute(NameOID.COMMON_NAME, identity.name),
        ]
    )
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server_names:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    now = datetime.now(UTC)
    # A certificate outliving its CA would only fail later and more confusingly.
    not_after = min(now + LEAF_VALIDITY, ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(identity.uri), *server_names]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _server_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h.strip() for h in hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
            continue
        except ValueError:
            pass
        if not _is_dns_name(host):
            raise InvalidArgument(detail=f"{host!r} is neither an IP address nor a DNS name")
        names.append(x509.DNSName(host.rstrip(".").lower()))
    return list(dict.fromkeys(names))


def _is_dns_name(host: str) -> bool:
    labels = host.removesuffix(".").split(".")
    return len(host) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in labels)


def _issue(
    ca_cert: x509.Certificate,
    ca_key: _PrivateKey,
    identity: Identity,
    out_dir: Path,
    stem: str,
    server_names: Sequence[x509.GeneralName] = (),
    *,
    replace: bool = True,
) -> None:
    key = _new_key()
    cert = _leaf_certificate(ca_cert, ca_key, identity, key.public_key(), server_names)
    # The key first: a certificate without its key is useless, a key without a certificate harmless.
    _write(out_dir / f"{stem}.key", _key_pem(key), mode=_KEY_MODE, replace=replace)
    _write(out_dir / f"{stem}.crt", _cert_pem(cert), mode=_CERT_MODE, replace=replace)


def _write_bundle(
    ca_cert: x509.Certificate,
    ca_key: _PrivateKey,
    identity: Identity,
    out_dir: Path,
    stem: str,
    *,
    force: bool,
) -> None:
    ca_pem = _cert_pem(ca_cert)
    if not force:
        _refuse_to_replace(out_dir, stem, ca_pem, identity)
    out_dir.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    _write(out_dir / CA_CERT, ca_pem, mode=_CERT_MODE)
    try:
        # Not forced: linked into place, never renamed over, so a bundle that appeared since
        # the check above is not replaced either.
        _issue(ca_cert, ca_key, identity, out_dir, stem, replace=force)
    except FileExistsError as e:
        raise _bundle_exists(out_dir, [Path(e.filename2 or stem).name], identity) from e


def _refuse_to_replace(out_dir: Path, stem: str, ca_pem: bytes, identity: Identity) -> None:
    """A bundle in `out_dir` is someone's identity in use: replacing it must be asked for."""
    existing = [name for name in (f"{stem}.crt", f"{stem}.key") if (out_dir / name).exists()]
    ca = out_dir / CA_CERT
    if ca.exists() and ca.read_bytes() != ca_pem:
        existing.append(f"{CA_CERT} of another CA")
    if existing:
        raise _bundle_exists(out_dir, existing, identity)


def _bundle_exists(out_dir: Path, names: Sequence[str], identity: Identity) -> Conflict:
    return Conflict(
        detail=f"{out_dir} already holds a certificate bundle ({', '.join(names)}); issuing "
        f"the {identity.role} {identity.name!r} there would replace the key whoever uses it "
        "now holds. Replace it with --force, or choose another --out directory."
    )


def _load_ca(pki_dir: Path) -> tuple[x509.Certificate, _PrivateKey]:
    try:
        cert_pem = (pki_dir / CA_CERT).read_bytes()
        key_pem = (pki_dir / CA_KEY).read_bytes()
    except FileNotFoundError as e:
        raise NotFound(
            f"No Coffer CA in {pki_dir} ({Path(e.filename).name} is missing); "
            f"create one with `coffer pki init --dir {pki_dir}`.",
            kind="CA",
            name=str(pki_dir),
        ) from e
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise CorruptData(what=f"the CA in {pki_dir}", detail=str(e)) from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CorruptData(what=f"the CA in {pki_dir}", detail="ca.key does not belong to ca.crt")
    return cert, key


def _key_pem(key: _PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca_exists(pki_dir: Path, names: Sequence[str]) -> Conflict:
    return Conflict(
        detail=f"{pki_dir} already holds a CA ({', '.join(names)}); refusing to replace it, "
        "since every certificate it issued would stop being trusted. Use another directory."
    )


# --- files ---------------------------------------------------------------------------------


def _write(path: Path, data: bytes, *, mode: int, replace: bool = True) -> None:
    """Write `path` atomically with `mode`; with replace=False, FileExistsError if it exists."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # os.open's mode went through the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
