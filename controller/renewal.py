"""The controller's own certificate: served without a restart, renewed before it expires.

Every listener (the mutual-TLS ones for agents and operators, and the enrolment listener, which
asks for no client certificate) serves `ServerIdentity`'s certificate with static credentials,
and is replaced by a new server with the new ones once `reload` has read the renewed files
(controller/listener.py says why static and how the replacement keeps open connections).
Connections already open keep the certificate they began with, which stays valid to its end.
The enrolment listener also sends the CA certificate in its chain: an agent without a CA takes
it from there, but only if its fingerprint is the one its token pins.

`CertificateMaintenance` runs under the controller's supervisor: it renews the controller's
certificate once 2/3 of its life (from its issue) has passed, with a new key and the same
names, superseding the old one; after that the private broker reloads (it serves the same
certificate, and the CRL now names the old one). It also rewrites the CRL daily, long before
the CRL's own 30 days run out. A controller started with a certificate already due renews it
before it starts listening.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Final

import grpc

from controller.pki import Authority
from controller.revocation import ISSUED_AT_RENEWAL, Revocations
from shared.clock import Clock
from shared.keyfiles import recover_pair
from shared.tls import CertificateFacts, TlsFiles, certificate_facts

log = logging.getLogger(__name__)

CRL_REFRESH_SECONDS: Final = 24 * 3600.0
# Look again at least this often: the clock may be stepped, and a sleep of months is fragile.
MAX_SLEEP_SECONDS: Final = 3600.0
MIN_SLEEP_SECONDS: Final = 1.0


class ServerIdentity:
    """The controller's certificate and key as its listeners serve them."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        recover_pair(files.cert, files.key)
        self._pem = files.read()
        self.previous: CertificateFacts | None = None
        """The certificate served before the last `reload` (its connections may still be open)."""

    @property
    def facts(self) -> CertificateFacts:
        return certificate_facts(self._pem.cert)

    def reload(self) -> None:
        """Read the certificate files again; credentials made from now on serve what they hold."""
        previous = self.facts
        self._pem = self._files.read()
        self.previous = previous

    def credentials(self, *, client_certificates: bool) -> grpc.ServerCredentials:
        """Credentials serving the current certificate: requiring a client certificate from our
        CA, or (`client_certificates=False`, the enrolment listener) none, sending the CA
        along."""
        pem = self._pem
        chain = pem.cert if client_certificates else pem.cert + b"\n" + pem.ca
        return grpc.ssl_server_credentials(
            [(pem.key, chain)],
            root_certificates=pem.ca if client_certificates else None,
            require_client_auth=client_certificates,
        )


class CertificateMaintenance:
    """Renews the controller's certificate when due and keeps the CRL fresh."""

    def __init__(
        self,
        authority: Authority,
        revocations: Revocations,
        identity: ServerIdentity,
        clock: Clock,
        lifetime: timedelta,
    ) -> None:
        self._authority = authority
        self._revocations = revocations
        self._identity = identity
        self._clock = clock
        self._lifetime = lifetime
        # Awaited after a renewal, first: each listener serves the new certificate
        # (controller.listener).
        self.listeners: list[Callable[[], Awaitable[None]]] = []
        # Called after a renewal (the private broker reloads).
        self.on_renewed: list[Callable[[], None]] = []

    def due_in(self) -> float:
        """Seconds until the controller's certificate is due for renewal (<= 0: now)."""
        return self._identity.facts.renewal_due.timestamp() - self._clock.now()

    async def renew_if_due(self) -> bool:
        if self.due_in() > 0:
            return False
        await self.renew()
        return True

    async def renew(self) -> None:
        old = self._identity.facts
        lifetime = self._lifetime
        certificate = await self._revocations.issue(
            lambda: self._authority.renew_controller(lifetime), ISSUED_AT_RENEWAL, supersedes=True
        )
        self._identity.reload()
        # Written again even when nothing was superseded: the broker reloads with it.
        await self._revocations.write_crl()
        for serve in self.listeners:
            await serve()
        for listener in self.on_renewed:
            listener()
        log.info(
            "renewed the controller's certificate: serial %s (valid to %s) replaces %s",
            f"{certificate.serial_number:x}",
            certificate.not_valid_after_utc.isoformat(timespec="seconds"),
            old.serial_hex,
        )

    async def run(self) -> None:
        while True:
            await self.renew_if_due()
            written = self._revocations.crl_written_at
            crl_in = 0.0 if written is None else written + CRL_REFRESH_SECONDS - self._clock.now()
            if crl_in <= 0:
                await self._revocations.write_crl()
                crl_in = CRL_REFRESH_SECONDS
            await asyncio.sleep(
                max(MIN_SLEEP_SECONDS, min(self.due_in(), crl_in, MAX_SLEEP_SECONDS))
            )
