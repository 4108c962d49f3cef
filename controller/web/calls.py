"""The console's actions are operator RPCs: called in-process, through the gRPC edge's checks.

Every page and action of the console calls a method of the same `OperatorService` object the
gRPC server serves, inside `CallerIdentity.admitted`: the one function the gRPC edge runs for
every operator RPC. So a browser's Backup now is the CLI's BackupNow: the same refusal of a
revoked certificate, the same role table (controller/access.py), the same audit entry (its
caller the certificate that asked for the sign-in link, its peer `web <browser address>`),
the same job with the operator as its requester.

Why not a loopback gRPC client acting for the operator: the controller does not have the
operator's private key (it never leaves the operator), so a loopback client would have to
present the *controller's* identity, or a certificate minted for the session; either is a
second identity with its own rights to keep equal to the operator's, and a place where a bug
grants more. Calling through `admitted` leaves one code path for identity, role and audit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf.message import Message

from controller.interceptors import CallerIdentity
from controller.operator_service import OperatorService
from controller.web.signin import Session
from shared.tls import ROLE_OPERATOR

R = TypeVar("R", bound=Message)


class _WebContext:
    """What a handler may ask of its call's context (they ask nothing today)."""

    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


class OperatorCalls:
    """Operator RPCs in the name of a signed-in session."""

    def __init__(self, service: OperatorService, edge: CallerIdentity) -> None:
        self._service = service
        self._edge = edge

    async def __call__(
        self, session: Session, method: str, request: Message, *, remote: str = ""
    ) -> Any:
        """The reply of `method` called with `request` by the session's certificate."""
        handler: Callable[[Message, Any], Awaitable[Any]] = getattr(self._service, method)
        peer = f"web {remote}".strip()
        async with self._edge.admitted(session.grant.pem, ROLE_OPERATOR, method, request, peer):
            return await handler(request, _WebContext(peer))
