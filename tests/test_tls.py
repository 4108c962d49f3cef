"""Mutual TLS end to end: the PKI's certificates over a real gRPC server, keepalive, MQTT."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import grpc
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.cli.pki import pki as pki_command
from controller.pki import init_pki, issue_agent, issue_operator
from shared.errors import Conflict, InvalidArgument, NotFound, Unauthenticated
from shared.rpc_channel import (
    KEEPALIVE_TIME_MS,
    KEEPALIVE_TIMEOUT_MS,
    channel_options,
    server_options,
)
from shared.tls import (
    Identity,
    TlsFiles,
    channel_credentials,
    identity_of_certificate,
    mqtt_ssl_context,
    peer_identity,
    server_credentials,
)

SERVICE = "coffer.test.Probe"
WHOAMI = f"/{SERVICE}/Whoami"
HOLD = f"/{SERVICE}/Hold"
VM = "vm-1"
# A peer that vanished without closing its socket is noticed within one keepalive interval
# and one timeout (shared/rpc_channel.py); a little more for a loaded machine.
DEAD_PEER_SECONDS = (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000 + 5


@dataclass(frozen=True)
class Pki:
    dir: Path
    controller: TlsFiles
    operator: TlsFiles
    agent: TlsFiles
    foreign: TlsFiles  # an agent of ANOTHER Coffer CA, with our CA to trust our server


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    init_pki(root / "ca")
    issue_agent(root / "ca", VM, root / "agent")
    init_pki(root / "other-ca")
    issue_agent(root / "other-ca", VM, root / "foreign")
    return Pki(
        dir=root / "ca",
        controller=TlsFiles.in_dir(root / "ca", "controller"),
        operator=TlsFiles.in_dir(root / "ca", "operator"),
        agent=TlsFiles.in_dir(root / "agent", "agent"),
        foreign=TlsFiles(
            ca=root / "ca" / "ca.crt",
            cert=root / "foreign" / "agent.crt",
            key=root / "foreign" / "agent.key",
        ),
    )


# --- a tiny real server --------------------------------------------------------------------


@dataclass
class Probe:
    """What the test servicer saw."""

    hold_started: asyncio.Event = field(default_factory=asyncio.Event)
    hold_ended: asyncio.Event = field(default_factory=asyncio.Event)
    hold_ended_at: float = 0.0
    calls: int = 0

    def handler(self) -> grpc.GenericRpcHandler:
        async def whoami(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.calls += 1
            try:
                identity = peer_identity(context)
            except Unauthenticated as e:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
            return str(identity).encode()

        async def hold(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            self.hold_started.set()
            try:
                async for request in requests:
                    yield b"echo " + request
            finally:
                self.hold_ended_at = time.monotonic()
                self.hold_ended.set()

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Whoami": grpc.unary_unary_rpc_method_handler(whoami),
                "Hold": grpc.stream_stream_rpc_method_handler(hold),
            },
        )


@dataclass
class Server:
    probe: Probe
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[Server]:
    probe = Probe()
    grpc_server = grpc.aio.server(options=server_options())
    grpc_server.add_generic_rpc_handlers((probe.handler(),))
    port = grpc_server.add_secure_port("127.0.0.1:0", server_credentials(pki.controller))
    await grpc_server.start()
    try:
        yield Server(probe, port)
    finally:
        await grpc_server.stop(grace=None)


async def whoami(
    target: str, credentials: grpc.ChannelCredentials, options: list[tuple[str, Any]] | None = None
) -> str:
    async with grpc.aio.secure_channel(
        target, credentials, options=options or channel_options()
    ) as channel:
        reply: bytes = await channel.unary_unary(WHOAMI)(b"", timeout=5)
        return reply.decode()


# --- identities over gRPC ------------------------------------------------------------------


async def test_server_sees_operator_identity(pki: Pki, server: Server) -> None:
    assert await whoami(server.target, channel_credentials(pki.operator)) == "operator/admin"


async def test_server_sees_agent_identity_as_its_vm(pki: Pki, server: Server) -> None:
    assert await whoami(server.target, channel_credentials(pki.agent)) == f"agent/{VM}"


async def test_controller_certificate_also_works_as_client(pki: Pki, server: Server) -> None:
    assert await whoami(server.target, channel_credentials(pki.controller)) == (
        "controller/coffer-controller"
    )


async def test_server_is_reachable_by_dns_name_in_its_certificate(pki: Pki, server: Server) -> None:
    target = f"localhost:{server.port}"
    assert await whoami(target, channel_credentials(pki.operator)) == "operator/admin"


async def test_client_without_certificate_is_refused(pki: Pki, server: Server) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.dir.joinpath("ca.crt").read_bytes()
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await whoami(server.target, credentials)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.probe.calls == 0


async def test_client_certificate_from_another_ca_is_refused(pki: Pki, server: Server) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.foreign.ca.read_bytes(),
        private_key=pki.foreign.key.read_bytes(),
        certificate_chain=pki.foreign.cert.read_bytes(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await whoami(server.target, credentials)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.probe.calls == 0


async def test_client_expecting_another_server_name_refuses_the_controller(
    pki: Pki, server: Server
) -> None:
    options = channel_options(server_name="not-the-controller.example")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await whoami(server.target, channel_credentials(pki.operator), options)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.probe.calls == 0


async def test_server_name_override_accepts_a_name_in_the_certificate(
    pki: Pki, server: Server
) -> None:
    options = channel_options(server_name="localhost")
    assert await whoami(server.target, channel_credentials(pki.agent), options) == f"agent/{VM}"


async def test_peer_identity_without_tls_is_unauthenticated() -> None:
    probe = Probe()
    grpc_server = grpc.aio.server()
    grpc_server.add_generic_rpc_handlers((probe.handler(),))
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary(WHOAMI)(b"", timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "no client certificate" in (caught.value.details() or "")
    finally:
        await grpc_server.stop(grace=None)


# --- keepalive -----------------------------------------------------------------------------

# A client that opens a Hold stream, gets one answer, says "ready" and then idles forever.
HOLDING_CLIENT = """
import asyncio, sys
from pathlib import Path
import grpc
from shared.rpc_channel import channel_options
from shared.tls import TlsFiles, channel_credentials

async def main() -> None:
    ca, cert, key, target = sys.argv[1:5]
    files = TlsFiles(ca=Path(ca), cert=Path(cert), key=Path(key))
    async with grpc.aio.secure_channel(
        target, channel_credentials(files), options=channel_options()
    ) as channel:
        call = channel.stream_stream("/coffer.test.Probe/Hold")()
        await call.write(b"hello")
        await call.read()
        print("ready", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def child(script: str, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A Python child process running `script`, killed (even when stopped) and reaped on exit."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def first_line(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
    return line.decode().strip()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("how", "signum"),
    [("killed", signal.SIGKILL), ("frozen", signal.SIGSTOP)],
)
async def test_server_notices_a_vanished_client_within_seconds(
    pki: Pki, server: Server, how: str, signum: int
) -> None:
    """A killed client's kernel closes its socket; a frozen one's does not, so only keepalive
    pings can tell the server (the same as a VM paused or cut off from the network)."""
    files = pki.agent
    args = (str(files.ca), str(files.cert), str(files.key), server.target)
    async with child(HOLDING_CLIENT, *args) as process:
        assert await first_line(process) == "ready"
        assert not server.probe.hold_ended.is_set()
        os.kill(process.pid, signum)
        vanished_at = time.monotonic()
        await asyncio.wait_for(server.probe.hold_ended.wait(), timeout=DEAD_PEER_SECONDS + 15)
        noticed_after = server.probe.hold_ended_at - vanished_at
        print(f"server noticed the {how} client after {noticed_after:.2f} s")
        assert noticed_after < DEAD_PEER_SECONDS


@pytest.mark.timeout(120)
async def test_pinging_idle_client_is_not_sent_away_for_too_many_pings(
    pki: Pki, server: Server
) -> None:
    async with grpc.aio.secure_channel(
        server.target, channel_credentials(pki.agent), options=channel_options()
    ) as channel:
        call = channel.stream_stream(HOLD)()
        await call.write(b"one")
        assert await call.read() == b"echo one"
        # Idle for 4 client pings: a server with gRPC's default enforcement (one ping per 5
        # minutes) takes the 2nd to 4th as strikes and sends GOAWAY "too_many_pings" at the 3rd.
        await asyncio.sleep(4.5 * KEEPALIVE_TIME_MS / 1000)
        await call.write(b"two")
        assert await call.read() == b"echo two"
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK


# A controller stand-in: serves Hold (echo) until it is killed, after printing its port.
ECHO_SERVER = """
import asyncio, sys
from pathlib import Path
import grpc
from shared.rpc_channel import server_options
from shared.tls import TlsFiles, server_credentials

async def hold(requests, context):
    async for request in requests:
        yield request

async def main() -> None:
    ca, cert, key = sys.argv[1:4]
    files = TlsFiles(ca=Path(ca), cert=Path(cert), key=Path(key))
    server = grpc.aio.server(options=server_options())
    handler = grpc.stream_stream_rpc_method_handler(hold)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("coffer.test.Probe", {"Hold": handler}),)
    )
    port = server.add_secure_port("127.0.0.1:0", server_credentials(files))
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


@pytest.mark.timeout(120)
async def test_client_notices_a_frozen_controller_within_seconds(pki: Pki) -> None:
    files = pki.controller
    async with child(ECHO_SERVER, str(files.ca), str(files.cert), str(files.key)) as process:
        port = int(await first_line(process))
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{port}", channel_credentials(pki.agent), options=channel_options()
        ) as channel:
            call = channel.stream_stream(HOLD)()
            await call.write(b"hello")
            assert await call.read() == b"hello"
            os.kill(process.pid, signal.SIGSTOP)
            frozen_at = time.monotonic()
            code = await asyncio.wait_for(call.code(), timeout=DEAD_PEER_SECONDS + 15)
            noticed_after = time.monotonic() - frozen_at
            print(f"client noticed the frozen controller after {noticed_after:.2f} s ({code})")
            assert code == grpc.StatusCode.UNAVAILABLE
            assert noticed_after < DEAD_PEER_SECONDS


# --- issuing -------------------------------------------------------------------------------


def test_keys_are_readable_by_owner_only(pki: Pki, tmp_path: Path) -> None:
    issue_operator(pki.dir, "alice", tmp_path / "alice")
    keys = [*pki.dir.glob("*.key"), pki.agent.key, tmp_path / "alice" / "operator.key"]
    assert len(keys) == 5
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert not [
        p for p in (*pki.dir.iterdir(), *pki.agent.key.parent.iterdir()) if ".tmp" in p.name
    ]


def test_issued_bundle_names_the_holder(pki: Pki, tmp_path: Path) -> None:
    issue_operator(pki.dir, "alice", tmp_path / "alice")
    alice = TlsFiles.in_dir(tmp_path / "alice", "operator")
    assert identity_of_certificate(alice.read().cert) == Identity("operator", "alice")
    agent = x509.load_pem_x509_certificate(pki.agent.cert.read_bytes())
    sans = agent.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [f"coffer://agent/{VM}"]


def test_init_refuses_to_overwrite_a_ca(pki: Pki) -> None:
    before = pki.dir.joinpath("ca.key").read_bytes()
    with pytest.raises(Conflict):
        init_pki(pki.dir)
    assert pki.dir.joinpath("ca.key").read_bytes() == before


def test_init_refuses_a_directory_with_only_a_ca_key(tmp_path: Path) -> None:
    tmp_path.joinpath("ca.key").write_bytes(b"an older CA key")
    with pytest.raises(Conflict):
        init_pki(tmp_path)
    assert tmp_path.joinpath("ca.key").read_bytes() == b"an older CA key"


def test_controller_certificate_lists_extra_hosts(tmp_path: Path) -> None:
    init_pki(tmp_path, hosts=["backup.example.org", "10.1.2.3"])
    cert = x509.load_pem_x509_certificate(tmp_path.joinpath("controller.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "backup.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.1.2.3"]


@pytest.mark.parametrize(
    "host", ["not a host", "", "a..b", "-a.example", "ünï.de", "a" * 300 + "!"]
)
def test_init_rejects_a_malformed_host(tmp_path: Path, host: str) -> None:
    with pytest.raises(InvalidArgument):
        init_pki(tmp_path, hosts=[host])
    assert not tmp_path.joinpath("ca.key").exists()


@pytest.mark.parametrize(
    "vm_id",
    ["", "VM1", "-vm", ".vm", "vm/1", "../etc", "vm 1", "a" * 64, "coffer-controller", "coffer-x"],
)
def test_invalid_vm_ids_are_refused(pki: Pki, tmp_path: Path, vm_id: str) -> None:
    with pytest.raises(InvalidArgument):
        issue_agent(pki.dir, vm_id, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("vm_id", ["0", "vm-1", "web.prod_2", "a" * 63])
def test_valid_vm_ids_are_issued(pki: Pki, tmp_path: Path, vm_id: str) -> None:
    issue_agent(pki.dir, vm_id, tmp_path)
    pem = TlsFiles.in_dir(tmp_path, "agent").read().cert
    assert identity_of_certificate(pem) == Identity("agent", vm_id)


def test_issuing_without_a_ca_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        issue_agent(tmp_path / "nothing", VM, tmp_path / "out")


# --- identity parsing and file checks ------------------------------------------------------


def _self_signed(subject: list[x509.NameAttribute[str]]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(subject)
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    "subject",
    [
        [("O", "Coffer"), ("CN", "vm-1")],  # no role
        [("O", "Coffer"), ("OU", "admin"), ("CN", "vm-1")],  # not a Coffer role
        [("O", "Acme"), ("OU", "agent"), ("CN", "vm-1")],  # not Coffer's
        [("O", "Coffer"), ("OU", "agent"), ("CN", "coffer-controller")],  # reserved VM id
        [("O", "Coffer"), ("OU", "controller"), ("CN", "vm-1")],  # controller has one name
        [("O", "Coffer"), ("OU", "agent"), ("OU", "operator"), ("CN", "vm-1")],  # two roles
    ],
)
def test_certificate_without_a_coffer_identity_is_unauthenticated(
    subject: list[tuple[str, str]],
) -> None:
    oids = {
        "O": NameOID.ORGANIZATION_NAME,
        "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
        "CN": NameOID.COMMON_NAME,
    }
    pem = _self_signed([x509.NameAttribute(oids[k], v) for k, v in subject])
    with pytest.raises(Unauthenticated):
        identity_of_certificate(pem)


def test_garbage_certificate_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated):
        identity_of_certificate(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


def test_tls_files_with_a_key_of_another_certificate_are_refused(pki: Pki) -> None:
    mixed = TlsFiles(ca=pki.agent.ca, cert=pki.agent.cert, key=pki.operator.key)
    with pytest.raises(InvalidArgument):
        mixed.read()


def test_tls_files_with_a_certificate_of_another_ca_are_refused(pki: Pki) -> None:
    with pytest.raises(InvalidArgument):
        pki.foreign.read()


def test_missing_tls_file_is_not_found(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        channel_credentials(
            TlsFiles(ca=pki.agent.ca, cert=tmp_path / "none.crt", key=pki.agent.key)
        )


# --- the CLI -------------------------------------------------------------------------------


def test_cli_init_and_issue(tmp_path: Path) -> None:
    runner = CliRunner()
    ca = tmp_path / "ca"
    result = runner.invoke(pki_command, ["init", "--dir", str(ca), "--host", "10.0.0.5"])
    assert result.exit_code == 0, result.output
    assert "10.0.0.5" in result.output
    assert "ca.key" in result.output

    out = tmp_path / "vm-7"
    result = runner.invoke(
        pki_command, ["issue-agent", "vm-7", "--dir", str(ca), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert identity_of_certificate(out.joinpath("agent.crt").read_bytes()) == Identity(
        "agent", "vm-7"
    )

    out = tmp_path / "bob"
    result = runner.invoke(
        pki_command, ["issue-operator", "bob", "--dir", str(ca), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert TlsFiles.in_dir(out, "operator").read()


def test_cli_errors_are_coffer_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(pki_command, ["init", "--dir", str(tmp_path)]).exit_code == 0
    result = runner.invoke(pki_command, ["init", "--dir", str(tmp_path)])
    assert isinstance(result.exception, Conflict)
    result = runner.invoke(
        pki_command, ["issue-agent", "Bad/Id", "--dir", str(tmp_path), "--out", str(tmp_path / "x")]
    )
    assert isinstance(result.exception, InvalidArgument)


# --- MQTT against a real Mosquitto ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def mosquitto(pki: Pki, tmp_path: Path) -> AsyncIterator[int]:
    # Debian installs it in /usr/sbin, which is not on every PATH.
    binary = shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    # deploy/install.sh installs it; without it this test must fail, not pass unseen.
    assert binary is not None, "mosquitto is not installed (Debian package mosquitto)"
    port = _free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(
        "\n".join(
            [
                "per_listener_settings false",
                "persistence false",
                "log_dest stderr",
                *(["user root"] if os.geteuid() == 0 else []),
                f"listener {port} 127.0.0.1",
                f"cafile {pki.controller.ca}",
                f"certfile {pki.controller.cert}",
                f"keyfile {pki.controller.key}",
                "require_certificate true",
                "use_identity_as_username true",
                "allow_anonymous false",
                "",
            ]
        )
    )
    process = await asyncio.create_subprocess_exec(
        binary, "-c", str(config), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if process.returncode is not None or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
            else:
                writer.close()
                await writer.wait_closed()
                break
        yield port
    finally:
        process.terminate()
        await process.wait()


@pytest.mark.timeout(30)
async def test_mqtt_client_with_agent_certificate_talks_to_broker(pki: Pki, mosquitto: int) -> None:
    topic = f"coffer/v1/test/{VM}"
    context = mqtt_ssl_context(pki.agent)
    async with aiomqtt.Client("127.0.0.1", mosquitto, tls_context=context, identifier=VM) as client:
        await client.subscribe(topic, qos=1)
        await client.publish(topic, b"hello", qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                assert message.payload == b"hello"
                break


@pytest.mark.timeout(30)
async def test_mqtt_client_with_certificate_of_another_ca_is_refused(
    pki: Pki, mosquitto: int
) -> None:
    context = mqtt_ssl_context(TlsFiles(ca=pki.agent.ca, cert=pki.agent.cert, key=pki.agent.key))
    context.load_cert_chain(certfile=str(pki.foreign.cert), keyfile=str(pki.foreign.key))
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", mosquitto, tls_context=context, timeout=5):
            pass
