"""The controller's gRPC edge: who calls, and how errors leave; one place for every RPC.

Two server interceptors wrap every handler of the agent and operator services, so no handler
repeats them:

- `ErrorMapping` (outermost): a handler raises a `CofferError` (or a task group raises only
  CofferErrors); the call ends with the error's gRPC status, its message as details and its
  stable code in the trailing metadata (`shared.rpc_errors.abort`), which the client turns back
  into the same error. Anything else is a bug: logged with its traceback and sent as an
  `InternalError`, never as gRPC's bare UNKNOWN.
- `CallerIdentity`: reads the caller's identity from its verified client certificate and checks
  it may use the service at all: the agent service only with an agent certificate, the
  operator service only with an operator certificate. Then, in this order: that the
  certificate is not revoked (`controller.revocation`; its first use supersedes older ones of
  the identity), that an operator's role may call the method (`controller.access`: a table,
  and a method not in it is refused to all), and it runs the call so that revoking the
  certificate ends it at once. Calls that change state, and every call it refuses, go into the
  audit log (`controller.audit`), and an operator's name becomes the requester of the jobs
  the call starts. Handlers read the caller with `caller()`, and an agent's VM id with
  `caller_vm()`. What one agent may touch (its own VM's jobs and data) is for the handlers to
  check: that depends on the request.

A handler keeps its shape: a coroutine stays a coroutine and an async generator (a streaming
reply) stays one, since gRPC tells the two apart to know how replies are sent.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import Any, Final, TypeAlias

import grpc
from google.protobuf.message import Message

from controller.access import LEGACY_ROLE, check_role
from controller.audit import AuditLog, set_requester
from controller.revocation import Revocations
from shared.errors import CofferError, PermissionDenied
from shared.rpc_errors import abort
from shared.tls import (
    ROLE_AGENT,
    ROLE_OPERATOR,
    CertificateFacts,
    Identity,
    OperatorRole,
    certificate_facts,
    peer_certificate_pem,
)

log = logging.getLogger(__name__)

# The role a caller's certificate must carry, by the full name of the service it calls.
SERVICE_ROLES: Final = {
    "coffer.v1.AgentService": ROLE_AGENT,
    "coffer.v1.OperatorService": ROLE_OPERATOR,
}

# Agent methods that change state (audited); every operator method's is in controller.access.
AGENT_CHANGES: Final = frozenset({"Renew"})

Context: TypeAlias = grpc.aio.ServicerContext
Behaviour: TypeAlias = Callable[[Any, Context], Any]
# Around one call: a context manager entered before the handler runs and left after it ends;
# it is given the request when there is one (not for a streamed request).
Guard: TypeAlias = Callable[[Context, Any], contextlib.AbstractAsyncContextManager[None]]

_caller: ContextVar[Identity] = ContextVar("coffer_caller")


def caller() -> Identity:
    """Who makes the RPC being handled (set by `CallerIdentity` before the handler runs)."""
    return _caller.get()


def caller_vm() -> str:
    """The VM id of the agent making the RPC being handled."""
    identity = caller()
    # CallerIdentity lets only agents into the agent service: anything else here is a bug.
    assert identity.role == ROLE_AGENT, f"{identity} is not an agent"
    return identity.name


class ErrorMapping(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """CofferErrors leave typed; anything else is logged and leaves as InternalError."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method

        @contextlib.asynccontextmanager
        async def mapped(context: Context, request: Any) -> AsyncIterator[None]:
            try:
                yield
            except grpc.aio.AbortError:
                raise  # the call was ended already, on purpose
            except Exception as exc:
                error = typed(exc)
                if error is None:
                    log.error(
                        "%s from %s failed unexpectedly", method, context.peer(), exc_info=exc
                    )
                    error = CofferError(
                        f"internal error in the controller ({type(exc).__name__}); "
                        "the controller's log has the details"
                    )
                elif method.startswith("/coffer.v1.AgentService/") and error.retry_after is None:
                    # An agent refused is a bug or an attack (or a second agent of one VM):
                    # the operator reads about it in the controller's log. One told to come
                    # back later (a busy or stopping controller) is neither.
                    log.warning("refused %s from %s: %s", method, context.peer(), error)
                await abort(context, error)

        return guarded(handler, mapped)


class CallerIdentity(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Only agents call the agent service, only operators the operator service, and only with
    a certificate still accepted and a role that may call the method; audited.

    Without `revocations` (tests of the edge alone) no certificate is revoked; without
    `audit` nothing is recorded.
    """

    def __init__(
        self, revocations: Revocations | None = None, audit: AuditLog | None = None
    ) -> None:
        self._revocations = revocations
        self._audit = audit
        self._legacy_warned: set[str] = set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        kind = SERVICE_ROLES.get(service)
        if handler is None or kind is None:
            return handler

        @contextlib.asynccontextmanager
        async def identified(context: Context, request: Any) -> AsyncIterator[None]:
            message = request if isinstance(request, Message) else None
            async with self.admitted(
                peer_certificate_pem(context), kind, method, message, context.peer()
            ):
                yield

        return guarded(handler, identified)

    @contextlib.asynccontextmanager
    async def admitted(
        self, pem: bytes, kind: str, method: str, message: Message | None, peer: str
    ) -> AsyncIterator[Identity]:
        """Run the call made within the block as the holder of certificate `pem` calling
        `method` of the service for callers of `kind`: refused (and audited) unless that
        certificate may, audited if the method changes state, ended if it is revoked meanwhile.

        The gRPC edge calls it for every RPC; the web console (controller.web) for every
        action its signed-in operator takes, with the certificate that asked for the sign-in
        link, so a browser gets exactly the rights and the audit trail of that certificate.
        """
        facts = certificate_facts(pem)
        identity = facts.identity
        role = self._role(facts)
        try:
            if identity.role != kind:
                raise _refusal(identity, kind)
            if self._revocations is not None:
                await self._revocations.admit(pem)
            changes = (
                check_role(identity.name, role or LEGACY_ROLE, method).changes
                if kind == ROLE_OPERATOR
                else method in AGENT_CHANGES
            )
        except CofferError as error:
            if self._audit is not None:
                await self._audit.refused(
                    who=identity.name,
                    kind=identity.role,
                    role=str(role or ""),
                    method=method,
                    error=error,
                    peer=peer,
                    request=message,
                )
            raise
        # Each call runs in a context of its own (a grpc.aio call's, a web request's task),
        # which ends with it.
        _caller.set(identity)
        if kind == ROLE_OPERATOR:
            set_requester(identity.name)
        async with contextlib.AsyncExitStack() as stack:
            if self._revocations is not None:
                await stack.enter_async_context(self._revocations.live(facts))
            if changes and self._audit is not None:
                await stack.enter_async_context(
                    self._audit.call(
                        who=identity.name,
                        kind=identity.role,
                        role=str(role or ""),
                        method=method,
                        request=message,
                        peer=peer,
                    )
                )
            yield identity

    def _role(self, facts: CertificateFacts) -> OperatorRole | None:
        """An operator certificate's role (one from before roles: the legacy role)."""
        if facts.identity.role != ROLE_OPERATOR:
            return None
        if facts.operator_role is not None:
            return facts.operator_role
        if facts.serial_hex not in self._legacy_warned:
            self._legacy_warned.add(facts.serial_hex)
            log.warning(
                "operator %r uses a certificate without a role (serial %s, issued before roles "
                "existed): taken as %s. Issue a new one with a role (`coffer pki "
                "issue-operator %s --role ROLE`), then revoke this one.",
                facts.identity.name,
                facts.serial_hex,
                LEGACY_ROLE,
                facts.identity.name,
            )
        return LEGACY_ROLE


def _refusal(identity: Identity, role: str) -> PermissionDenied:
    if role == ROLE_AGENT:
        return PermissionDenied(detail=f"{identity.role} {identity.name!r} is not an agent")
    return PermissionDenied(detail=f"{identity} may not use the operator API")


def typed(exc: BaseException) -> CofferError | None:
    """The CofferError `exc` is; for a group, its first when every error in it is one."""
    if isinstance(exc, CofferError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        leaves = list(_leaves(exc))
        if leaves and all(isinstance(leaf, CofferError) for leaf in leaves):
            first = leaves[0]
            assert isinstance(first, CofferError)
            return first
    return None


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


# --- wrapping a handler --------------------------------------------------------------------


def guarded(handler: grpc.RpcMethodHandler, guard: Guard) -> grpc.RpcMethodHandler:
    """`handler` with every call run inside `guard`; same arity, (de)serializers and shape."""
    kinds = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
    }
    attribute, make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    behaviour: Behaviour = getattr(handler, attribute)
    wrapped: grpc.RpcMethodHandler = make(
        _wrap(behaviour, guard),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    return wrapped


def _wrap(behaviour: Behaviour, guard: Guard) -> Behaviour:
    if inspect.isasyncgenfunction(behaviour):

        async def replies(request: Any, context: Context) -> AsyncIterator[Any]:
            async with guard(context, request):
                async for reply in behaviour(request, context):
                    yield reply

        return replies

    async def call(request: Any, context: Context) -> Any:
        async with guard(context, request):
            return await behaviour(request, context)

    return call
