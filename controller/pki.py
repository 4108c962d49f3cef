"""The controller CA: creating it, issuing certificates, its ledger of them, and its CRL.

Only the controller host holds the CA key. Layout of a pki directory (`init_pki`):

    ca.crt, ca.key                  the CA (EC P-256, valid 10 years; never overwritten)
    controller.crt, controller.key  `coffer-controller`: serverAuth + clientAuth (it is also an
                                    MQTT client), SANs localhost, 127.0.0.1 and the given hosts
    operator.crt, operator.key      operator `admin`, role admin: clientAuth
    issued/<serial>.crt             the ledger: every certificate this CA issued, by anyone
    ca.crl                          the revoked certificates (written by the controller)

`issue_agent` and `issue_operator` (offline, on the CA host) write a bundle (`ca.crt` plus
the holder's certificate and key) to hand to one agent or operator; they refuse to replace a
bundle already there unless forced, since the agent or operator using it would lose its key.
Such certificates are valid 2 years. The running controller issues through `Authority`:
certificates for keys it never sees (an agent's certificate request at enrolment and renewal)
and its own renewed one, with the lifetime of its config.

The ledger is how every issuer, offline or not, knows what was issued: the controller revokes
by name every certificate the ledger has for it, and names are kept apart by kind (an operator
cannot be issued the name of an agent the ledger knows, nor an agent that of an operator, and
`coffer-...` is the controller's), so a CN always names one identity, as MQTT needs.

Subjects follow the identity model of `shared.tls`. Keys are written with mode 0600, every
file atomically (`shared.keyfiles`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import secrets
from collections.abc import Collection, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import (
    CofferError,
    Conflict,
    CorruptData,
    InvalidArgument,
    NameReserved,
    NotFound,
)
from shared.keyfiles import (
    PRIVATE_DIR_MODE,
    PRIVATE_MODE,
    PUBLIC_MODE,
    install_pair,
    recover_pair,
    write_file,
)
from shared.tls import (
    BACKDATE,
    CONTROLLER_NAME,
    ORGANIZATION,
    ROLE_AGENT,
    ROLE_ATTRIBUTE,
    ROLE_CONTROLLER,
    ROLE_OPERATOR,
    CertificateFacts,
    Identity,
    OperatorRole,
    certificate_fingerprint,
    facts_of,
    serial_hex,
    validate_new_operator_name,
    validate_vm_id,
)

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CRL = "ca.crl"
LEDGER = "issued"
ADMIN_OPERATOR = "admin"
DEFAULT_CONTROLLER_HOSTS = ("localhost", "127.0.0.1")

CA_VALIDITY = timedelta(days=3652)
LEAF_VALIDITY = timedelta(days=730)
# A CRL is rewritten at least daily; one that lapsed would make Mosquitto refuse everybody.
CRL_VALIDITY = timedelta(days=30)

_KEY_MODE = PRIVATE_MODE
_CERT_MODE = PUBLIC_MODE
_DIR_MODE = PRIVATE_DIR_MODE
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

    ca = _Ca(pki_dir, ca_cert, ca_key)
    _issue(ca, Identity(ROLE_CONTROLLER, CONTROLLER_NAME), pki_dir, "controller", names)
    _issue(
        ca, Identity(ROLE_OPERATOR, ADMIN_OPERATOR), pki_dir, "operator", role=OperatorRole.ADMIN
    )


def issue_agent(pki_dir: Path, vm_id: str, out_dir: Path, *, force: bool = False) -> None:
    """Write `ca.crt`, `agent.crt` and `agent.key` for the agent of VM `vm_id` to `out_dir`.

    Refuses (Conflict) to replace a bundle `out_dir` holds unless `force`, and (NameReserved)
    a VM id the ledger knows as an operator's name."""
    identity = Identity(ROLE_AGENT, validate_vm_id(vm_id))
    ca = _load_ca(pki_dir)
    check_name_free(ledger(pki_dir), identity)
    _write_bundle(ca, identity, out_dir, "agent", force=force)


def issue_operator(
    pki_dir: Path,
    name: str,
    out_dir: Path,
    *,
    role: OperatorRole = OperatorRole.READER,
    force: bool = False,
) -> None:
    """Write `ca.crt`, `operator.crt` and `operator.key` for operator `name` to `out_dir`.

    Refuses (Conflict) to replace a bundle `out_dir` holds unless `force`, and (NameReserved)
    the controller's name, `coffer-...`, and a name the ledger knows as an agent's."""
    identity = Identity(ROLE_OPERATOR, validate_new_operator_name(name))
    ca = _load_ca(pki_dir)
    check_name_free(ledger(pki_dir), identity)
    _write_bundle(ca, identity, out_dir, "operator", force=force, role=role)


def check_name_free(issued: Iterable[CertificateFacts], identity: Identity) -> None:
    """NameReserved if a certificate of another kind than `identity`'s carries its name.

    A CN must name one identity: Mosquitto knows a client by nothing else.
    """
    for facts in issued:
        other = facts.identity
        if other.name == identity.name and other.role != identity.role:
            raise NameReserved(
                name=identity.name,
                wanted=f"an {identity.role}" if identity.role[0] in "aeiou" else identity.role,
                why=f"this CA issued it to an {other.role} (serial {facts.serial_hex}); agents "
                "and operators never share a name, on MQTT a certificate is known by its name "
                "alone. Choose another name",
            )


# --- the running controller's CA -----------------------------------------------------------


class Authority:
    """The CA as the controller uses it: issuing for requests, its ledger, its CRL.

    Loaded once at start (`Authority.load`); blocking file work, so callers run its methods
    in a thread.
    """

    def __init__(self, pki_dir: Path, ca: _Ca) -> None:
        self.pki_dir = pki_dir
        self._ca = ca
        self._ledger: dict[str, CertificateFacts] = {}

    @classmethod
    def load(cls, pki_dir: Path) -> Authority:
        return cls(pki_dir, _load_ca(pki_dir))

    @property
    def ca_pem(self) -> bytes:
        return _cert_pem(self._ca.cert)

    @property
    def ca_fingerprint(self) -> str:
        return certificate_fingerprint(self._ca.cert.public_bytes(serialization.Encoding.DER))

    @property
    def crl_path(self) -> Path:
        return self.pki_dir / CRL

    def ledger(self, known: Collection[str] = ()) -> dict[str, CertificateFacts]:
        """Every certificate in the ledger, by serial (hex), but those of `known` serials
        (which the caller has already: a controller's start skips the fleet's certificates
        its catalog holds, 1-2 ms each to parse); new files are read once."""
        if known:
            skip = frozenset(known)
            unknown = {k: v for k, v in self._ledger.items() if k not in skip}
            return _read_ledger(self.pki_dir, unknown, skip)
        self._ledger = _read_ledger(self.pki_dir, self._ledger)
        return dict(self._ledger)

    def record(self, certificate: x509.Certificate) -> CertificateFacts:
        """Put a certificate this CA issued into the ledger (one issued before there was a
        ledger, seen in use); it is left as it is if there already."""
        facts = facts_of(certificate)
        with _writing(self.pki_dir / LEDGER):
            _record(self.pki_dir, certificate, replace=False)
        self._ledger[facts.serial_hex] = facts
        return facts

    def issue(
        self,
        identity: Identity,
        public_key: ec.EllipticCurvePublicKey,
        lifetime: timedelta,
        *,
        server_names: Sequence[x509.GeneralName] = (),
        role: OperatorRole | None = None,
    ) -> x509.Certificate:
        """A certificate for `public_key` (whose private key stays with its holder), in the
        ledger before it is returned."""
        certificate = _leaf_certificate(
            self._ca, identity, public_key, server_names, role=role, lifetime=lifetime
        )
        with _writing(self.pki_dir / LEDGER):
            _record(self.pki_dir, certificate)
        self._ledger[serial_hex(certificate.serial_number)] = facts_of(certificate)
        return certificate

    def renew_controller(self, lifetime: timedelta) -> x509.Certificate:
        """Replace the controller's certificate and key in the pki directory with new ones
        (new key, same names); returns the new certificate."""
        files_cert = self.pki_dir / "controller.crt"
        files_key = self.pki_dir / "controller.key"
        recover_pair(files_cert, files_key)
        current = x509.load_pem_x509_certificate(files_cert.read_bytes())
        sans = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        server_names = [
            *sans.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)),
        ]
        key = _new_key()
        certificate = self.issue(
            Identity(ROLE_CONTROLLER, CONTROLLER_NAME),
            key.public_key(),
            lifetime,
            server_names=_server_names(server_names),
        )
        with _writing(files_cert):
            install_pair(files_cert, files_key, _cert_pem(certificate), _key_pem(key))
        return certificate

    def write_crl(self, revoked: Iterable[tuple[int, datetime]], now: datetime) -> None:
        """Write `ca.crl` naming the serials `revoked` (with their revocation times)."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._ca.cert.subject)
            .last_update(now - BACKDATE)
            .next_update(now + CRL_VALIDITY)
        )
        for serial, at in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(at).build()
            )
        crl = builder.sign(self._ca.key, hashes.SHA256())
        with _writing(self.crl_path):
            write_file(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), mode=_CERT_MODE)


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """The controller's CA files could not be written: a typed error naming the file."""
    try:
        yield
    except OSError as exc:
        raise CofferError(
            f"cannot write {path} in the CA directory: {exc.strerror or exc}; the controller "
            "needs to write its ledger, its CRL and its renewed certificate there"
        ) from exc


def public_key_of_request(csr_pem: bytes) -> tuple[str, ec.EllipticCurvePublicKey]:
    """The subject CN and the public key of a certificate request, checked: it parses, it is
    signed by its own key (its sender holds the private key), and that key is EC P-256."""
    try:
        request = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise InvalidArgument(
            detail="the certificate request is not a PEM PKCS#10 request"
        ) from exc
    public_key = request.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise InvalidArgument(detail="the certificate request's key must be EC P-256")
    if not request.is_signature_valid:
        raise InvalidArgument(detail="the certificate request is not signed by its own key")
    names = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise InvalidArgument(detail="the certificate request must name one subject CN")
    value = names[0].value
    return (value if isinstance(value, str) else value.decode()), public_key


def ledger(pki_dir: Path) -> list[CertificateFacts]:
    """Every certificate in the ledger of the CA in `pki_dir`."""
    return list(_read_ledger(pki_dir, {}).values())


def _read_ledger(
    pki_dir: Path, known: dict[str, CertificateFacts], skip: Collection[str] = ()
) -> dict[str, CertificateFacts]:
    directory = pki_dir / LEDGER
    found = dict(known)
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return found
    for path in entries:
        serial = path.name.removesuffix(".crt")
        if serial in found or serial in skip:
            continue
        if not path.name.endswith(".crt") or path.name.startswith("."):
            continue
        try:
            certificate = x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError as exc:
            raise CorruptData(what=str(path), detail=f"not a PEM certificate ({exc})") from exc
        found[serial] = facts_of(certificate)
    return found


def _record(pki_dir: Path, certificate: x509.Certificate, *, replace: bool = True) -> None:
    directory = pki_dir / LEDGER
    directory.mkdir(mode=_DIR_MODE, exist_ok=True)
    path = directory / f"{serial_hex(certificate.serial_number)}.crt"
    # Recorded already, when not replacing: the ledger only grows.
    with contextlib.suppress(FileExistsError):
        write_file(path, _cert_pem(certificate), mode=_CERT_MODE, replace=replace)


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
    ca: _Ca,
    identity: Identity,
    public_key: ec.EllipticCurvePublicKey,
    server_names: Sequence[x509.GeneralName],
    *,
    role: OperatorRole | None = None,
    lifetime: timedelta = LEAF_VALIDITY,
) -> x509.Certificate:
    attributes = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role),
        x509.NameAttribute(NameOID.COMMON_NAME, identity.name),
    ]
    if identity.role == ROLE_OPERATOR:
        attributes.append(x509.NameAttribute(ROLE_ATTRIBUTE, str(role or OperatorRole.READER)))
    subject = x509.Name(attributes)
    ca_cert, ca_key = ca.cert, ca.key
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server_names:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    now = datetime.now(UTC)
    # A certificate outliving its CA would only fail later and more confusingly.
    not_after = min(now + lifetime, ca_cert.not_valid_after_utc)
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
    ca: _Ca,
    identity: Identity,
    out_dir: Path,
    stem: str,
    server_names: Sequence[x509.GeneralName] = (),
    *,
    role: OperatorRole | None = None,
    replace: bool = True,
) -> None:
    key = _new_key()
    cert = _leaf_certificate(ca, identity, key.public_key(), server_names, role=role)
    # In the ledger before anyone can use it: whatever is used can be revoked by name.
    _record(ca.pki_dir, cert)
    # The key first: a certificate without its key is useless, a key without a certificate harmless.
    _write(out_dir / f"{stem}.key", _key_pem(key), mode=_KEY_MODE, replace=replace)
    _write(out_dir / f"{stem}.crt", _cert_pem(cert), mode=_CERT_MODE, replace=replace)


def _write_bundle(
    ca: _Ca,
    identity: Identity,
    out_dir: Path,
    stem: str,
    *,
    force: bool,
    role: OperatorRole | None = None,
) -> None:
    ca_pem = _cert_pem(ca.cert)
    if not force:
        _refuse_to_replace(out_dir, stem, ca_pem, identity)
    out_dir.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    _write(out_dir / CA_CERT, ca_pem, mode=_CERT_MODE)
    try:
        # Not forced: linked into place, never renamed over, so a bundle that appeared since
        # the check above is not replaced either.
        _issue(ca, identity, out_dir, stem, role=role, replace=force)
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


class _Ca:
    """A loaded CA: its directory, certificate and key."""

    def __init__(self, pki_dir: Path, cert: x509.Certificate, key: _PrivateKey) -> None:
        self.pki_dir = pki_dir
        self.cert = cert
        self.key = key


def _load_ca(pki_dir: Path) -> _Ca:
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
    return _Ca(pki_dir, cert, key)


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
    write_file(path, data, mode=mode, replace=replace)
