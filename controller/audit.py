"""The audit log, and who asked for what: every state-changing call with its caller and outcome.

The gRPC edge (`controller.interceptors`) writes an entry for every call of a method that
changes state (`controller.access` says which) and for every call it refuses: who (the name in
the caller's certificate), what kind of caller, an operator's role, the method, a summary of
the request (as JSON, secrets left out, long values shortened), the caller's address, when,
and how it ended (`OK` or the error code, with its message). The entry is written before the
call runs, so that a call the audit log cannot record does not run at all, and its outcome
when it ends; an entry without an outcome is a call the controller's stop interrupted.

Who asked for a job is kept beside it (`requested_by`): the edge sets the operator's name for
the call, the job runner gives a job's own work the name its job was asked for by (so a prune
that follows a backup is the backup's requester's), and what starts anywhere else is the
scheduler's ("schedule").
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from typing import Any, Final

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from controller.catalog import AuditFilter, AuditRecord, Catalog
from shared.clock import Clock
from shared.errors import CofferError, find_coffer_error

SCHEDULE: Final = "schedule"
OK: Final = "OK"
CANCELLED: Final = "Cancelled"
KIND_ENROLMENT: Final = "enrolment"

# Request fields whose values never enter the log, by name.
_SECRET_FIELD = re.compile(r"secret|token|passphrase|password|private|key_pem|csr", re.IGNORECASE)
_MAX_VALUE = 200
_MAX_SUMMARY = 2000

_requester: ContextVar[str] = ContextVar("coffer_requester", default=SCHEDULE)


def requested_by() -> str:
    """Who asks for what is being done now: an operator's name, or "schedule"."""
    return _requester.get()


def set_requester(name: str) -> None:
    """Make `name` the requester of the rest of this context (an RPC's, which ends with it)."""
    _requester.set(name)


@contextlib.contextmanager
def requested(name: str) -> Iterator[None]:
    """Within the block, `requested_by()` is `name`."""
    token = _requester.set(name)
    try:
        yield
    finally:
        _requester.reset(token)


def summarize(request: Message | dict[str, Any] | None) -> str:
    """A request as short JSON for the log: secret fields left out, long values shortened."""
    if request is None:
        return ""
    if isinstance(request, Message):
        request = MessageToDict(request, preserving_proto_field_name=True)
    shown = _redact(request)
    text = json.dumps(shown, sort_keys=True, ensure_ascii=True)
    return text if len(text) <= _MAX_SUMMARY else text[: _MAX_SUMMARY - 3] + "..."


def _redact(value: Any, name: str = "") -> Any:
    if name and _SECRET_FIELD.search(name):
        return "(not recorded)"
    if isinstance(value, dict):
        return {key: _redact(item, key) for key, item in value.items()}
    if isinstance(value, list):
        return [_redact(item) for item in value]
    if isinstance(value, str) and len(value) > _MAX_VALUE:
        return value[:_MAX_VALUE] + "..."
    return value


def outcome_of(error: BaseException | None) -> tuple[str, str]:
    """The outcome (`OK`, an error code, `Cancelled`) and message of a call that ended so."""
    if error is None:
        return OK, ""
    if isinstance(error, BaseException) and not isinstance(error, Exception):
        return CANCELLED, "the call was cancelled"
    typed = find_coffer_error(error)
    if typed is None:
        return CofferError.code, f"internal error ({type(error).__name__})"
    return typed.code, typed.message


class AuditLog:
    """Writes and reads the audit log in the catalog."""

    def __init__(self, catalog: Catalog, clock: Clock) -> None:
        self._catalog = catalog
        self._clock = clock

    @contextlib.asynccontextmanager
    async def call(
        self,
        *,
        who: str,
        kind: str,
        method: str,
        request: Message | dict[str, Any] | None = None,
        role: str = "",
        peer: str = "",
    ) -> AsyncIterator[None]:
        """Record the call made within the block: before it runs, and how it ended."""
        entry = await self._catalog.insert_audit(
            AuditRecord(
                at=self._clock.now(),
                who=who,
                kind=kind,
                role=role,
                method=method,
                arguments=summarize(request),
                peer=peer,
            )
        )
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            outcome, message = outcome_of(error)
            await self._catalog.finish_audit(entry, outcome, message)

    async def refused(
        self,
        *,
        who: str,
        kind: str,
        method: str,
        error: CofferError,
        role: str = "",
        peer: str = "",
        request: Message | dict[str, Any] | None = None,
    ) -> None:
        """Record a call the edge refused before it ran."""
        await self._catalog.insert_audit(
            AuditRecord(
                at=self._clock.now(),
                who=who,
                kind=kind,
                role=role,
                method=method,
                arguments=summarize(request),
                outcome=error.code,
                message=error.message,
                peer=peer,
            )
        )

    async def entries(self, where: AuditFilter) -> list[AuditRecord]:
        return await self._catalog.audit(where)
