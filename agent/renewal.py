"""Renewing the agent's certificate before it expires: a new key, over the agent's session.

Once 2/3 of its certificate's life has passed (`shared.tls.renewal_due`), the agent makes a new
key, sends a certificate request for it over its mutual-TLS channel (`AgentService.Renew`),
and replaces its certificate and key together (`shared.keyfiles.install_pair`, safe against a
crash). It renews while no command runs, so no job is cut by the reconnect that follows: the
session ends and the agent dials again at once with the new certificate, whose first use
revokes the old one at the controller. A renewal that fails (the controller unreachable, or
refusing) is tried again later; the old certificate still has a third of its life to go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import grpc
from cryptography import x509

from agent.config import AgentConfig
from agent.enrolment import certificate_request, check_issued, key_pem, new_key
from shared.backoff import Backoff
from shared.errors import CofferError
from shared.keyfiles import install_pair, recover_pair
from shared.rpc import agent_pb2, agent_pb2_grpc
from shared.rpc_errors import from_rpc_error
from shared.tls import renewal_due

log = logging.getLogger(__name__)

RETRY: Final = Backoff(first=60.0, cap=3600.0, jitter="full")
CALL_SECONDS: Final = 30.0


class Renewed(Exception):
    """The certificate was renewed: the session ends so that the agent dials with the new one."""


def seconds_until_due(config: AgentConfig, now: float | None = None) -> float:
    """Seconds until the agent's certificate is due for renewal (<= 0: it is due)."""
    recover_pair(config.tls.cert, config.tls.key)
    certificate = x509.load_pem_x509_certificate(config.tls.cert.read_bytes())
    due = renewal_due(certificate.not_valid_before_utc, certificate.not_valid_after_utc)
    return due.timestamp() - (time.time() if now is None else now)


async def renew_when_due(
    config: AgentConfig,
    stub: agent_pb2_grpc.AgentServiceStub,
    idle: Callable[[], Awaitable[object]],
) -> None:
    """Wait until the certificate is due and no command runs (`idle` returns), then renew
    it; raise Renewed."""
    attempt = 0
    while True:
        wait = await asyncio.to_thread(seconds_until_due, config)
        if wait > 0:
            await asyncio.sleep(wait)
            continue
        await idle()
        try:
            await renew(config, stub)
        except (CofferError, grpc.RpcError) as exc:
            error = from_rpc_error(exc) if isinstance(exc, grpc.RpcError) else exc
            delay = RETRY.delay(attempt)
            attempt += 1
            log.warning("renewing the certificate failed (%s); again in %.0f s", error, delay)
            await asyncio.sleep(delay)
            continue
        # The old certificate works until the new one is used: a command that came in
        # meanwhile finishes before the session is dialled again.
        await idle()
        raise Renewed


async def renew(config: AgentConfig, stub: agent_pb2_grpc.AgentServiceStub) -> None:
    """Renew the agent's certificate now: new key, new certificate, installed together."""
    key = await asyncio.to_thread(new_key)
    request = agent_pb2.RenewRequest(csr_pem=certificate_request(config.vm_id, key).decode())
    reply = await stub.Renew(request, timeout=CALL_SECONDS)
    certificate_pem = reply.certificate_pem.encode()
    check_issued(certificate_pem, config.tls.ca.read_bytes(), key, config.vm_id)
    await asyncio.to_thread(
        install_pair, config.tls.cert, config.tls.key, certificate_pem, key_pem(key)
    )
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    log.info(
        "renewed this agent's certificate: serial %x, valid to %s",
        certificate.serial_number,
        certificate.not_valid_after_utc.isoformat(timespec="seconds"),
    )
