"""Identities against real processes: enrolment, revocation, renewal, roles, reserved names,
the audit log.

A real controller with its private Mosquitto and enrolment listener, real agents, the real
`coffer` and `coffer-agent enrol` commands (`tests.cluster`). What a user would check: the
exit code and error code of a refused command, whether an agent is online and backs up, and
what the broker and the controller accept.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.enrolment import certificate_request, new_key
from controller.pki import LEDGER, Authority, _server_names, init_pki, issue_agent
from shared.errors import ERROR_CODE_METADATA_KEY
from shared.keyfiles import install_pair
from shared.rpc import agent_pb2, agent_pb2_grpc, enrolment_pb2, enrolment_pb2_grpc
from shared.rpc_channel import channel_options
from shared.tls import (
    CONTROLLER_NAME,
    ROLE_CONTROLLER,
    Identity,
    TlsFiles,
    channel_credentials,
    mqtt_ssl_context,
)
from tests.cluster import BIN, Cluster

MiB = 1 << 20
pytestmark = pytest.mark.integration


def agent_bin(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "coffer-agent"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def coffer(
    cluster: Cluster, *args: str, tls: Path | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "coffer"), "--controller", f"127.0.0.1:{cluster.port}"]
    argv += ["--tls-dir", str(tls or cluster.pki), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def refused(result: subprocess.CompletedProcess[str], exit_code: int, error_code: str) -> None:
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    assert f"({error_code})" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def token_for(cluster: Cluster, vm_id: str, expires: str = "1h") -> str:
    made = cluster.coffer("enrol", "create", "--vm", vm_id, "--expires", expires)
    assert made["vm_id"] == vm_id
    assert made["enrol_address"] == f"127.0.0.1:{cluster.enrol_port}"
    return str(made["token"])


def enrol(
    cluster: Cluster, vm_id: str, token: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    agent = cluster.agents[vm_id]
    return agent_bin(
        "enrol", "--controller", f"127.0.0.1:{cluster.enrol_port}", "--config",
        str(agent.config), *extra, env={"COFFER_ENROL_TOKEN": token},
    )  # fmt: skip


def tls_of(cluster: Cluster, vm_id: str) -> TlsFiles:
    return TlsFiles.in_dir(cluster.root / f"tls-{vm_id}", "agent")


def error_code(exc: grpc.aio.AioRpcError) -> str:
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_CODE_METADATA_KEY:
            return str(value)
    return ""


async def check(cluster: Cluster, tls: TlsFiles) -> agent_pb2.CheckReply:
    """The agent API's Check, called with `tls` (an agent's certificate)."""
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{cluster.port}", channel_credentials(tls), options=channel_options()
    ) as channel:
        reply: agent_pb2.CheckReply = await agent_pb2_grpc.AgentServiceStub(channel).Check(
            agent_pb2.CheckRequest(), timeout=10
        )
        return reply


async def check_refused(cluster: Cluster, tls: TlsFiles) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check(cluster, tls)
    return error_code(caught.value)


def broker_address(cluster: Cluster) -> tuple[str, int]:
    conf = (cluster.root / "state" / "broker" / "mosquitto.conf").read_text()
    match = re.search(r"^listener (\d+) (\S+)$", conf, re.MULTILINE)
    assert match is not None, conf
    return match[2], int(match[1])


async def mqtt_connects(cluster: Cluster, tls: TlsFiles) -> bool:
    host, port = broker_address(cluster)
    try:
        async with aiomqtt.Client(host, port, tls_context=mqtt_ssl_context(tls), timeout=5):
            return True
    except aiomqtt.MqttError:
        return False


def wait_for(predicate: Any, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def crl_serials(cluster: Cluster) -> set[int]:
    crl = x509.load_pem_x509_crl((cluster.pki / "ca.crl").read_bytes())
    return {revoked.serial_number for revoked in crl}


def serial_of(tls: TlsFiles) -> int:
    return x509.load_pem_x509_certificate(tls.cert.read_bytes()).serial_number


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("identities")
    with Cluster(root / "cluster") as running:
        yield running


def disk(cluster: Cluster, name: str) -> Path:
    path = cluster.root / f"{name}.img"
    path.write_bytes(os.urandom(2 * MiB))
    return path


# --- enrolment -----------------------------------------------------------------------------


def test_an_enrolled_agent_comes_online_and_backs_up(cluster: Cluster) -> None:
    agent = cluster.add_agent(
        "enrolled-1", {"root": disk(cluster, "enrolled-1")}, start=False, issue=False
    )
    result = enrol(cluster, "enrolled-1", token_for(cluster, "enrolled-1"))
    assert result.returncode == 0, result.stderr
    tls = tls_of(cluster, "enrolled-1")
    assert stat.S_IMODE(tls.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(tls.cert.parent.stat().st_mode) == 0o700
    assert tls.ca.read_bytes() == (cluster.pki / "ca.crt").read_bytes()

    cluster.start_agent("enrolled-1")
    job = cluster.backup("enrolled-1")
    assert job["status"] == "Completed", job
    shown = cluster.coffer("job", "show", job["id"])
    assert shown["requested_by"] == "admin"
    text = coffer(cluster, "job", "show", job["id"]).stdout
    assert re.search(r"^Requested by\s+admin$", text, re.MULTILINE), text

    # Its certificate came from the enrolment, and the key never left the VM: the
    # controller's ledger has the certificate, nothing there has the key.
    listed = cluster.coffer("pki", "list", "enrolled-1")
    assert [(c["issued_by"], c["status"]) for c in listed] == [("enrolment", "valid")]
    key = tls.key.read_bytes()
    assert not [
        p for p in cluster.root.rglob("*") if p.is_file() and p != tls.key and key in p.read_bytes()
    ]
    assert agent.process.alive()


def test_a_token_enrols_once(cluster: Cluster) -> None:
    cluster.add_agent("replay-1", {}, start=False, issue=False)
    token = token_for(cluster, "replay-1")
    assert enrol(cluster, "replay-1", token).returncode == 0
    refused(enrol(cluster, "replay-1", token, "--force"), 6, "EnrolmentTokenUsed")


def test_an_expired_token_is_refused(cluster: Cluster) -> None:
    cluster.add_agent("late-1", {}, start=False, issue=False)
    token = token_for(cluster, "late-1", expires="1s")
    time.sleep(1.5)
    refused(enrol(cluster, "late-1", token), 6, "EnrolmentTokenExpired")
    assert not tls_of(cluster, "late-1").cert.exists()


def test_a_token_enrols_only_its_vm(cluster: Cluster) -> None:
    cluster.add_agent("other-1", {}, start=False, issue=False)
    token = token_for(cluster, "mine-1")
    # The agent config of another VM: refused before anything is sent.
    refused(enrol(cluster, "other-1", token), 6, "EnrolmentVmMismatch")
    # A request naming another VM, sent to the listener anyway: refused there.
    reply = asyncio.run(_enrol_raw(cluster, token, certificate_request("other-1", new_key())))
    assert reply == "EnrolmentVmMismatch"
    # The token was not spent by those: its own VM still enrols with it.
    cluster.add_agent("mine-1", {}, start=False, issue=False)
    assert enrol(cluster, "mine-1", token).returncode == 0


def test_forged_tokens_and_foreign_controllers_are_refused(cluster: Cluster) -> None:
    cluster.add_agent("forged-1", {}, start=False, issue=False)
    token = token_for(cluster, "forged-1")
    prefix, token_id, secret, ca, vm = token.split(":")
    other_secret = ("A" if secret[0] != "A" else "B") + secret[1:]
    refused(
        enrol(cluster, "forged-1", ":".join((prefix, token_id, other_secret, ca, vm))),
        6,
        "EnrolmentTokenInvalid",
    )
    refused(enrol(cluster, "forged-1", "coffer-enrol-1:nonsense"), 6, "EnrolmentTokenInvalid")
    # A token pinning another CA: the listener is not that controller, nothing is sent.
    refused(
        enrol(cluster, "forged-1", ":".join((prefix, token_id, secret, "0" * 64, vm))),
        6,
        "Unauthenticated",
    )
    # None of that spent the token.
    assert enrol(cluster, "forged-1", token).returncode == 0


def test_the_enrolment_listener_refuses_big_requests_and_wants_no_client_certificate(
    cluster: Cluster,
) -> None:
    cluster.add_agent("big-1", {}, start=False, issue=False)
    token = token_for(cluster, "big-1")
    reply = asyncio.run(_enrol_raw(cluster, token, b"x" * (64 * 1024)))
    assert reply == "RESOURCE_EXHAUSTED"
    reply = asyncio.run(_enrol_raw(cluster, token, b"-----BEGIN CERTIFICATE REQUEST-----\nno\n"))
    assert reply == "InvalidArgument"
    # Only the enrolment RPC is served there.
    ca = (cluster.pki / "ca.crt").read_bytes()

    async def agent_api_on_enrol_port() -> grpc.StatusCode:
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{cluster.enrol_port}", grpc.ssl_channel_credentials(ca)
        ) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await agent_pb2_grpc.AgentServiceStub(channel).Check(
                    agent_pb2.CheckRequest(), timeout=10
                )
            code: grpc.StatusCode = caught.value.code()
            return code

    assert asyncio.run(agent_api_on_enrol_port()) == grpc.StatusCode.UNIMPLEMENTED
    assert enrol(cluster, "big-1", token).returncode == 0


async def _enrol_raw(cluster: Cluster, token: str, csr: bytes) -> str:
    """The error code (or gRPC status) of an Enrol call with this request."""
    ca = (cluster.pki / "ca.crt").read_bytes()
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{cluster.enrol_port}", grpc.ssl_channel_credentials(ca)
    ) as channel:
        try:
            await enrolment_pb2_grpc.EnrolmentServiceStub(channel).Enrol(
                enrolment_pb2.EnrolRequest(token=token, csr_pem=csr.decode()), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            return error_code(exc) or exc.code().name
    return "OK"


def test_the_main_listener_still_wants_a_client_certificate_of_our_ca(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Its credentials are reloadable now; what they refuse stays the same."""
    init_pki(tmp_path / "other-ca")
    issue_agent(tmp_path / "other-ca", "vm-1", tmp_path / "foreign")
    foreign = TlsFiles(
        ca=cluster.pki / "ca.crt",
        cert=tmp_path / "foreign" / "agent.crt",
        key=tmp_path / "foreign" / "agent.key",
    )
    ca = (cluster.pki / "ca.crt").read_bytes()

    async def refused_by_tls(credentials: grpc.ChannelCredentials) -> grpc.StatusCode:
        async with grpc.aio.secure_channel(f"127.0.0.1:{cluster.port}", credentials) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await agent_pb2_grpc.AgentServiceStub(channel).Check(
                    agent_pb2.CheckRequest(), timeout=10
                )
            code: grpc.StatusCode = caught.value.code()
            return code

    assert asyncio.run(refused_by_tls(grpc.ssl_channel_credentials(ca))) == (
        grpc.StatusCode.UNAVAILABLE
    )
    assert (
        asyncio.run(
            refused_by_tls(
                grpc.ssl_channel_credentials(
                    ca, foreign.key.read_bytes(), foreign.cert.read_bytes()
                )
            )
        )
        == grpc.StatusCode.UNAVAILABLE
    )


# --- revocation ----------------------------------------------------------------------------


def test_revoking_a_live_agent_ends_its_session_and_the_broker_refuses_it(
    cluster: Cluster,
) -> None:
    agent = cluster.add_agent("revoked-1", {"root": disk(cluster, "revoked-1")})
    tls = tls_of(cluster, "revoked-1")
    assert asyncio.run(mqtt_connects(cluster, tls))

    started = time.monotonic()
    revoked = cluster.coffer("pki", "revoke", "revoked-1")
    assert [c["status"] for c in revoked] == ["revoked"]
    assert revoked[0]["revoked_by"] == "admin"
    cluster.wait_online("revoked-1", timeout=5, online=False)
    assert time.monotonic() - started < 5
    # Reconnecting is refused, with the reason.
    assert asyncio.run(check_refused(cluster, tls)) == "CertificateRevoked"
    agent.process.wait_for_line("CertificateRevoked", timeout=30)
    # The broker has the CRL and refuses a new connection with it.
    assert serial_of(tls) in crl_serials(cluster)
    assert not asyncio.run(mqtt_connects(cluster, tls))
    agent.process.stop()

    # Enrolled again, the VM is back.
    assert enrol(cluster, "revoked-1", token_for(cluster, "revoked-1"), "--force").returncode == 0
    cluster.start_agent("revoked-1")
    assert asyncio.run(mqtt_connects(cluster, tls_of(cluster, "revoked-1")))


def test_a_reissued_certificate_revokes_the_old_one_once_used(cluster: Cluster) -> None:
    cluster.add_agent("reissued-1", {}, start=False)
    old = tls_of(cluster, "reissued-1")
    asyncio.run(check(cluster, old))
    spare = cluster.root / "tls-reissued-1-new"
    subprocess.run(
        [str(BIN / "coffer"), "pki", "issue-agent", "reissued-1", "--dir", str(cluster.pki),
         "--out", str(spare)],
        check=True, capture_output=True,
    )  # fmt: skip
    new = TlsFiles.in_dir(spare, "agent")
    asyncio.run(check(cluster, new))
    assert asyncio.run(check_refused(cluster, old)) == "CertificateRevoked"
    asyncio.run(check(cluster, new))
    statuses = {c["serial"]: c["status"] for c in cluster.coffer("pki", "list", "reissued-1")}
    assert statuses == {f"{serial_of(old):x}": "superseded", f"{serial_of(new):x}": "valid"}
    assert serial_of(old) in crl_serials(cluster)
    assert not asyncio.run(mqtt_connects(cluster, old))
    assert asyncio.run(mqtt_connects(cluster, new))


def test_the_controller_cannot_be_revoked(cluster: Cluster) -> None:
    refused(coffer(cluster, "pki", "revoke", CONTROLLER_NAME), 2, "InvalidArgument")
    refused(coffer(cluster, "pki", "revoke", "nobody-at-all"), 4, "NotFound")


# --- operator roles ------------------------------------------------------------------------


def operator(cluster: Cluster, name: str, role: str) -> Path:
    out = cluster.root / f"operator-{name}"
    if not out.exists():
        result = subprocess.run(
            [str(BIN / "coffer"), "pki", "issue-operator", name, "--role", role, "--dir",
             str(cluster.pki), "--out", str(out)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    return out


def test_each_role_may_do_what_it_is_for_and_no_more(cluster: Cluster) -> None:
    cluster.add_agent("roles-1", {"root": disk(cluster, "roles-1")})
    cluster.protect("roles-1")
    reader = operator(cluster, "rita", "reader")
    op = operator(cluster, "otto", "operator")

    # A reader reads.
    for args in (("vault", "list"), ("agents",), ("job", "list"), ("items", "--vault", "local")):
        assert coffer(cluster, *args, tls=reader).returncode == 0, args
    # ... and changes nothing: no backup, no delete, no vault.
    refused(coffer(cluster, "backup-now", "roles-1", tls=reader), 6, "InsufficientRole")
    refused(coffer(cluster, "vault", "delete", "local", tls=reader), 6, "InsufficientRole")
    refused(coffer(cluster, "audit", "list", tls=reader), 6, "InsufficientRole")
    # An operator backs up, but creates no vault and revokes nobody.
    result = coffer(cluster, "backup-now", "roles-1", "--json", tls=op)
    assert result.returncode == 0, result.stderr
    backup = json.loads(result.stdout)
    assert backup["requested_by"] == "otto"
    refused(
        coffer(cluster, "vault", "create", "otto-vault", "--region", "x", tls=op),
        6,
        "InsufficientRole",
    )
    refused(coffer(cluster, "pki", "revoke", "rita", tls=op), 6, "InsufficientRole")
    refused(coffer(cluster, "enrol", "create", "--vm", "x-1", tls=op), 6, "InsufficientRole")
    # An admin may.
    assert coffer(cluster, "vault", "create", "admin-vault", "--region", "x").returncode == 0

    # The audit log has who did what, refusals too.
    entries = cluster.coffer("audit", "list", "--who", "otto")
    seen = {(e["method"], e["outcome"], e["role"]) for e in entries}
    assert ("BackupNow", "OK", "operator") in seen
    assert ("CreateVault", "InsufficientRole", "operator") in seen
    assert ("RevokeCertificates", "InsufficientRole", "operator") in seen
    created = cluster.coffer("audit", "list", "--method", "CreateVault", "--who", "admin")
    assert created
    assert created[0]["outcome"] == "OK"
    assert json.loads(created[0]["arguments"])["name"] == "admin-vault"
    refusals = cluster.coffer("audit", "list", "--who", "rita")
    assert {e["method"] for e in refusals} >= {"BackupNow", "DeleteVault", "ListAudit"}
    # Reads are not audited.
    assert not cluster.coffer("audit", "list", "--who", "rita", "--method", "ListVaults")


# --- reserved names ------------------------------------------------------------------------


def test_reserved_names_are_refused(cluster: Cluster, tmp_path: Path) -> None:
    def issue(kind: str, name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "coffer"), "pki", f"issue-{kind}", name, "--dir", str(cluster.pki),
             "--out", str(tmp_path / f"{kind}-{name}")],
            capture_output=True, text=True,
        )  # fmt: skip

    cluster.add_agent("vm-b", {}, start=False)
    refused(issue("operator", CONTROLLER_NAME), 5, "NameReserved")
    refused(issue("operator", "coffer-ops"), 5, "NameReserved")
    refused(issue("operator", "vm-b"), 5, "NameReserved")
    operator(cluster, "alice", "reader")
    refused(issue("agent", "alice"), 5, "NameReserved")
    refused(coffer(cluster, "enrol", "create", "--vm", "alice"), 5, "NameReserved")
    # Nothing was issued for them.
    names = {
        x509.load_pem_x509_certificate(p.read_bytes()).subject.rfc4514_string()
        for p in (cluster.pki / LEDGER).glob("*.crt")
    }
    assert not [n for n in names if "coffer-ops" in n or ("vm-b" in n and "operator" in n)]


# --- renewal -------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_agents_and_the_controller_renew_their_certificates(tmp_path: Path) -> None:
    """Certificates that live 45 s: the agent and the controller renew theirs after 30 s,
    without a restart, and the old ones are revoked."""
    with Cluster(tmp_path / "renewing", certificate_days=45 / 86400) as cluster:
        _shorten_the_controllers_certificate(cluster)
        cluster.stop_controller()
        cluster.start_controller()
        first_server = _served_serial(cluster, cluster.port)
        first_broker = _served_serial(cluster, broker_address(cluster)[1])
        assert first_server == first_broker

        agent = cluster.add_agent(
            "renewing-1", {"root": disk(cluster, "renewing-1")}, start=False, issue=False
        )
        assert enrol(cluster, "renewing-1", token_for(cluster, "renewing-1")).returncode == 0
        tls = tls_of(cluster, "renewing-1")
        first_agent = serial_of(tls)
        cluster.start_agent("renewing-1")

        wait_for(lambda: serial_of(tls) != first_agent, timeout=90, what="agent renewal")
        agent.process.wait_for_line("renewed this agent's certificate", timeout=10)
        cluster.wait_online("renewing-1")
        statuses = {c["serial"]: c["status"] for c in cluster.coffer("pki", "list", "renewing-1")}
        wait_for(
            lambda: (
                {c["serial"]: c["status"] for c in cluster.coffer("pki", "list", "renewing-1")}[
                    f"{first_agent:x}"
                ]
                == "superseded"
            ),
            timeout=20,
            what="the old agent certificate superseded",
        )
        statuses = {c["serial"]: c["status"] for c in cluster.coffer("pki", "list", "renewing-1")}
        assert statuses[f"{serial_of(tls):x}"] == "valid"
        job = cluster.backup("renewing-1")
        assert job["status"] == "Completed"

        # The controller renewed its own: both listeners and the broker serve the new one,
        # the old one is revoked, and the controller never restarted.
        wait_for(
            lambda: _served_serial(cluster, cluster.port) != first_server,
            timeout=60,
            what="controller renewal",
        )
        renewed = _served_serial(cluster, cluster.port)
        assert _served_serial(cluster, cluster.enrol_port) == renewed
        wait_for(lambda: _served_serial(cluster, broker_address(cluster)[1]) == renewed, timeout=10)
        assert first_server in crl_serials(cluster)
        assert cluster.controller.alive()
        assert "renewed the controller's certificate" in cluster.controller.log.read_text()


def _shorten_the_controllers_certificate(cluster: Cluster) -> None:
    """Give the controller a certificate as short-lived as the ones it issues."""
    authority = Authority.load(cluster.pki)
    current = x509.load_pem_x509_certificate((cluster.pki / "controller.crt").read_bytes())
    key = new_key()
    sans = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = [
        *sans.get_values_for_type(x509.DNSName),
        *map(str, sans.get_values_for_type(x509.IPAddress)),
    ]
    certificate = authority.issue(
        Identity(ROLE_CONTROLLER, CONTROLLER_NAME), key.public_key(), timedelta(seconds=45),
        server_names=_server_names(names),
    )  # fmt: skip
    install_pair(
        cluster.pki / "controller.crt",
        cluster.pki / "controller.key",
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _served_serial(cluster: Cluster, port: int) -> int:
    """The serial of the certificate a TLS listener on loopback serves now (we present the
    admin's certificate, for the listeners that want one)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(cluster.pki / "operator.crt", cluster.pki / "operator.key")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number
