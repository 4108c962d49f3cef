"""A controller listener serves its certificate with static credentials and is replaced by a
new server when the certificate is renewed: new connections get the new certificate, the
calls under way on the old server go on, and a stop ends both.

Real gRPC servers and clients with mutual TLS from a real PKI on loopback; the service is a
small echo stream of the test's own, since the listener is the same whatever it serves."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from controller.listener import Listener
from controller.pki import Authority, init_pki
from controller.renewal import ServerIdentity
from shared.rpc_channel import secure_channel, server_options
from shared.tls import TlsFiles

pytestmark = pytest.mark.timeout(60)

SERVICE = "coffer.test.Echo"


def echo_server() -> grpc.aio.Server:
    async def stream(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
        async for request in requests:
            yield b"echo:" + request

    # The controller's own server options: SO_REUSEPORT off among them, so the new server binds
    # only once the old one has let the port go (with gRPC's default, on, a connection could
    # still reach the stopping server and be reset).
    server = grpc.aio.server(options=server_options())
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Stream": grpc.stream_stream_rpc_method_handler(
                        stream, request_deserializer=bytes, response_serializer=bytes
                    )
                },
            ),
        )
    )
    return server


def served_serial(port: int, pki: Path) -> int:
    """The serial of the certificate the listener serves to a new connection."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(pki / "operator.crt", pki / "operator.key")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def echo(call: grpc.aio.StreamStreamCall, word: bytes) -> bytes:
    await call.write(word)
    reply = await call.read()
    assert isinstance(reply, bytes), reply
    return reply


async def test_a_renewal_serves_the_new_certificate_and_keeps_the_calls_under_way(
    tmp_path: Path,
) -> None:
    pki = tmp_path / "pki"
    init_pki(pki)
    identity = ServerIdentity(TlsFiles.in_dir(pki, "controller"))
    listener = Listener("listen", "127.0.0.1:0", echo_server, identity, client_certificates=True)
    port = await listener.start()
    first = served_serial(port, pki)
    operator = TlsFiles.in_dir(pki, "operator")
    try:
        async with secure_channel(f"127.0.0.1:{port}", operator) as old_channel:
            method = f"/{SERVICE}/Stream"
            old_call = old_channel.stream_stream(
                method, request_serializer=bytes, response_deserializer=bytes
            )()
            assert await echo(old_call, b"before") == b"echo:before"

            Authority.load(pki).renew_controller(timedelta(days=30))
            identity.reload()
            await listener.renew()

            assert listener.port == port  # the same port: agents dial where they did
            renewed = served_serial(port, pki)
            assert renewed != first
            assert identity.facts.serial == renewed
            # The session under way did not notice.
            assert await echo(old_call, b"during") == b"echo:during"
            # A new connection reaches the new server, with the new certificate.
            async with secure_channel(f"127.0.0.1:{port}", operator) as new_channel:
                new_call = new_channel.stream_stream(
                    method, request_serializer=bytes, response_deserializer=bytes
                )()
                assert await echo(new_call, b"new") == b"echo:new"
                assert await echo(old_call, b"still") == b"echo:still"

                # A stop ends both servers' calls within its grace, not the renewal's drain.
                await asyncio.wait_for(listener.stop(0.5), timeout=10)
                for call in (old_call, new_call):
                    with pytest.raises((grpc.RpcError, asyncio.InvalidStateError)):
                        await echo(call, b"after")
    finally:
        await listener.stop(0)
    with pytest.raises(ConnectionRefusedError):  # nothing listens any more
        served_serial(port, pki)
