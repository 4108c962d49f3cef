"""Operator roles: the table of who may call which operator RPC, checked at the gRPC edge.

The table must name every method of OperatorService (a new RPC is refused to everyone until it
is given a role: this test then fails, which is the point), each role may do what the one
below it may, and an operator certificate from before roles is taken as admin. The edge is
the real one (`tests.served`), with real certificates.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.access import ADMIN, OPERATOR, OPERATOR_METHODS, READER, check_role
from controller.pki import issue_operator
from shared.errors import ERROR_CODE_METADATA_KEY, InsufficientRole
from shared.rpc import operator_pb2, operator_pb2_grpc
from shared.tls import OperatorRole, TlsFiles, certificate_facts
from tests.served import Served, served

pytestmark = pytest.mark.timeout(60)

SERVICE = operator_pb2.DESCRIPTOR.services_by_name["OperatorService"]


def test_every_operator_method_has_a_role() -> None:
    methods = {method.name for method in SERVICE.methods}
    missing = methods - set(OPERATOR_METHODS)
    assert not missing, f"give these operator RPCs a role in controller/access.py: {missing}"
    assert set(OPERATOR_METHODS) <= methods, set(OPERATOR_METHODS) - methods


def test_a_method_not_in_the_table_is_refused_even_to_an_admin() -> None:
    with pytest.raises(InsufficientRole):
        check_role("admin", ADMIN, "SomethingNew")


@pytest.mark.parametrize(
    ("method", "reader", "operator", "admin"),
    [
        ("ListJobs", True, True, True),
        ("Dashboard", True, True, True),
        ("BackupNow", False, True, True),
        ("Restore", False, True, True),
        ("CancelJob", False, True, True),
        ("CreateVault", False, False, True),
        ("DeleteVault", False, False, True),
        ("DeletePolicy", False, False, True),
        ("StopProtection", False, False, True),
        ("RevokeCertificates", False, False, True),
        ("CreateEnrolmentToken", False, False, True),
        ("ListAudit", False, False, True),
    ],
)
def test_each_role_may_what_the_one_below_may_and_more(
    method: str, reader: bool, operator: bool, admin: bool
) -> None:
    for role, allowed in ((READER, reader), (OPERATOR, operator), (ADMIN, admin)):
        if allowed:
            check_role("someone", role, method)
        else:
            with pytest.raises(InsufficientRole):
                check_role("someone", role, method)


def test_state_changing_methods_are_audited_and_reads_are_not() -> None:
    changing = {name for name, access in OPERATOR_METHODS.items() if access.changes}
    assert {"BackupNow", "CreateVault", "RevokeCertificates", "CreateEnrolmentToken"} <= changing
    assert not changing & {"ListJobs", "GetJob", "WatchJob", "ListAudit", "ListCertificates"}


# --- at the edge ---------------------------------------------------------------------------


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[Served]:
    async with served(tmp_path) as running:
        yield running


def _error_code(exc: grpc.aio.AioRpcError) -> str:
    return next(
        (str(v) for k, v in exc.trailing_metadata() or () if k == ERROR_CODE_METADATA_KEY), ""
    )


async def test_a_reader_is_refused_a_backup_at_the_edge(edge: Served, tmp_path: Path) -> None:
    issue_operator(edge.pki, "rita", tmp_path / "rita", role=OperatorRole.READER)
    async with edge.channel(TlsFiles.in_dir(tmp_path / "rita", "operator")) as channel:
        stub = operator_pb2_grpc.OperatorServiceStub(channel)
        await stub.ListVaults(operator_pb2.ListVaultsRequest())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.BackupNow(operator_pb2.BackupNowRequest(vms=["x"]))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _error_code(refused.value) == "InsufficientRole"
    assert "needs the role operator" in (refused.value.details() or "")


def _legacy_operator(pki: Path, out: Path, name: str) -> TlsFiles:
    """An operator certificate as issued before roles: no role in it."""
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Coffer"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "operator"),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir()
    (out / "ca.crt").write_bytes((pki / "ca.crt").read_bytes())
    (out / "operator.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "operator.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return TlsFiles.in_dir(out, "operator")


async def test_an_operator_certificate_from_before_roles_is_an_admin_with_a_warning(
    edge: Served, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    legacy = _legacy_operator(edge.pki, tmp_path / "old", "olga")
    assert certificate_facts(legacy.read().cert).operator_role is None
    caplog.set_level(logging.WARNING, logger="controller.interceptors")
    async with edge.channel(legacy) as channel:
        stub = operator_pb2_grpc.OperatorServiceStub(channel)
        vault = await stub.CreateVault(operator_pb2.CreateVaultRequest(name="olgas", region="r"))
        await stub.ListVaults(operator_pb2.ListVaultsRequest())
    assert vault.name == "olgas"
    warnings = [r for r in caplog.records if "without a role" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert "olga" in warnings[0].getMessage()
