"""A TLS listener of the controller: a gRPC server on one address, serving the controller's
certificate with static credentials, replaced by a new server when the certificate is renewed.

Why static: gRPC's dynamic server credentials ask a Python function before every TLS
handshake, on gRPC's own threads, each taking the GIL. In a storm of thousands of handshakes
(a fleet reconnecting after a restart) those threads queued on the GIL behind a busy event
loop instead of answering keepalive pings, and sessions that were fine were cut (issue 13).
With static credentials a handshake never enters Python.

The price is that a renewed certificate needs a new server: `renew` builds one with the new
credentials and binds it to the same address and port the moment the old server stops
listening (gRPC closes the old listening socket as soon as its stop begins). The old server
keeps the connections it has: each is told (an HTTP/2 GOAWAY) to make new calls elsewhere,
which reach the new server, while the calls under way, the agents' sessions among them, go on
until they end or the old certificate would have expired. A connection that is already
authenticated does not look at the certificate again, so nothing is cut short by the
renewal; a client that dials in the few milliseconds between the two servers is refused and
dials again, as after any blip. While the old server drains, its connections count against
its own connection quota, not the new server's: for a while after a renewal the two together
may hold up to twice a listener's quota of descriptors (the budget in controller/descriptors.py
does not count that).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Final

import grpc

from controller.renewal import ServerIdentity
from shared.address import parse_address
from shared.errors import Unavailable

log = logging.getLogger(__name__)

REBIND_SECONDS: Final = 5.0
"""How long `renew` keeps trying to bind the port the old server is letting go of."""
MIN_DRAIN_SECONDS: Final = 3600.0
"""The least the old server's calls are given to end after a renewal, even when the old
certificate expires sooner (its connections are authenticated already)."""


class Listener:
    """One address the controller listens on, with the controller's certificate."""

    def __init__(
        self,
        key: str,
        address: str,
        build: Callable[[], grpc.aio.Server],
        identity: ServerIdentity,
        *,
        client_certificates: bool,
    ) -> None:
        """`key` names the address in the config (for errors); `build` makes a server with
        its options, interceptors and services, not yet bound."""
        self._key = key
        self._address = address
        self._build = build
        self._identity = identity
        self._client_certificates = client_certificates
        self._server: grpc.aio.Server | None = None
        # Servers a renewal replaced, each with the task of its stop (their calls draining).
        self._draining: dict[grpc.aio.Server, asyncio.Task[None]] = {}
        self.port = 0

    async def start(self) -> int:
        """Listen on the configured address; the port it got (the config may ask for 0)."""
        server = self._build()
        self.port = _bind(server, self._address, self._credentials(), self._key)
        await server.start()
        self._server = server
        return self.port

    async def renew(self) -> None:
        """Serve the identity's current certificate: a new server on the same port; the old
        one keeps the calls it has until they end (or a long while: `MIN_DRAIN_SECONDS`, or
        the old certificate's validity if longer)."""
        old = self._server
        if old is None:
            return
        server = self._build()
        credentials = self._credentials()
        previous = self._identity.previous
        left = 0.0 if previous is None else previous.not_after.timestamp() - time.time()
        drain = max(MIN_DRAIN_SECONDS, left)
        stopping = asyncio.create_task(old.stop(drain), name=f"drain-{self._key}")
        self._draining[old] = stopping
        stopping.add_done_callback(lambda _: self._draining.pop(old, None))
        address = str(replace(parse_address(self._address, allow_port_zero=True), port=self.port))
        deadline = time.monotonic() + REBIND_SECONDS
        while True:
            try:
                _bind(server, address, credentials, self._key)
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)
        await server.start()
        self._server = server
        log.info("%s: serving the renewed certificate on port %d", self._key, self.port)

    async def stop(self, grace: float) -> None:
        """Stop the server and any the renewals left draining, their calls given `grace`."""
        # A draining server stopped again with a shorter grace ends its calls sooner, and its
        # first stop returns with it.
        servers = [*self._draining, *([self._server] if self._server is not None else [])]
        draining = list(self._draining.values())
        self._server = None
        await asyncio.gather(*(server.stop(grace) for server in servers))
        await asyncio.gather(*draining)

    def _credentials(self) -> grpc.ServerCredentials:
        return self._identity.credentials(client_certificates=self._client_certificates)


def _bind(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials, key: str
) -> int:
    """Bind `address` (the config's `key`); Unavailable when another process has the port."""
    try:
        port: int = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpc's only word for "could not bind"
        raise Unavailable(
            f"cannot listen on {address}: {str(exc).split(';')[0]}. Is another "
            "controller running, "
            f"or is the address wrong (`{key}` in the controller config)?"
        ) from exc
    return port
