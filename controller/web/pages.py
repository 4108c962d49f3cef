"""The console's pages and actions: each a handler that calls operator RPCs and renders.

Pages (GET): `/vaults`; `/vaults/{vault}` (its dashboard); `/vaults/{vault}/items`;
`/vaults/{vault}/policies`; `/vms/{vm}/recovery-points` (with the restore form); `/jobs` (the
CLI's filters: status, operation, vault, VM, from, to, limit); `/jobs/{id}` (live: its
`/jobs/{id}/state` JSON is polled by static/console.js, or the page refreshes itself without
JavaScript); `/alerts`; the sign-in page `/login/{token}`.

Actions (POST, each with the session's CSRF token): Backup now
(`/vaults/{vault}/items/{vm}/backup`, BackupNow), cancel a job (`/jobs/{id}/cancel`,
CancelJob), restore (`/vms/{vm}/restore`, Restore), sign in (`/login/{token}`), sign out
(`/logout`). An action that starts a job redirects to that job's page.

Names and messages shown come from agents and operators and are untrusted: templates escape
every value (Jinja2's autoescape), scripts never build HTML, and the CSP forbids inline
script, so a VM named `<script>...` is text. An error from the API is shown as the CLI shows
it (its code and message), with the HTTP status its gRPC status maps to.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final
from zoneinfo import ZoneInfo

import jinja2
from aiohttp import web
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from controller.web.calls import OperatorCalls
from controller.web.signin import COOKIE, Session, Sessions, SignInLinks
from shared.clock import Clock
from shared.errors import CofferError, InvalidArgument
from shared.model import JobStatus, Operation
from shared.policy import Policy
from shared.rpc import operator_pb2
from shared.tls import OperatorRole

HTTP_STATUS: Final = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
JOB_LIMITS: Final = (25, 50, 100, 500)
HTML: Final = "text/html"


# --- how values read -------------------------------------------------------------------------


def _stamp(stamp: Timestamp) -> datetime | None:
    if stamp.seconds == 0 and stamp.nanos == 0:
        return None
    return stamp.ToDatetime(tzinfo=UTC)


def when(stamp: Timestamp, zone: str = "") -> str:
    """ISO 8601 to the second with its offset, in `zone` (default UTC); '-' when unset."""
    moment = _stamp(stamp)
    if moment is None:
        return "-"
    if zone:
        moment = moment.astimezone(ZoneInfo(zone))
    return moment.isoformat(timespec="seconds")


def size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def span(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def duration(job: operator_pb2.Job, now: float) -> str:
    start = _stamp(job.started_at)
    if start is None:
        return "-"
    end = _stamp(job.ended_at)
    seconds = (end.timestamp() if end else now) - start.timestamp()
    return span(max(seconds, 0.0))


def flatten(details: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """A job's details as label and text, nested objects as indented rows."""
    rows: list[tuple[str, str]] = []
    for key, value in details.items():
        label = prefix + key.replace("_", " ").capitalize()
        if isinstance(value, dict):
            rows.append((label, ""))
            rows += flatten(value, prefix + "\u2003")
        elif isinstance(value, list):
            rows.append((label, ", ".join(map(str, value)) or "none"))
        else:
            rows.append((label, "-" if value is None else str(value)))
    return rows


def restore_rows(job: operator_pb2.Job) -> list[tuple[str, str]]:
    """What a restore or a drill restored where, and what it moved (as `coffer job show`)."""
    if not job.HasField("restore"):
        return []
    restored = job.restore
    rows = [
        ("Restored from", restored.source_vm_id or "-"),
        ("Restored on", restored.target_vm_id or "-"),
        ("Target", restored.target_path or "-"),
        ("Mode", restored.mode + (", overwriting" if restored.overwrite else "")),
    ]
    if restored.bytes_compared:
        rows.append(("Bytes compared", f"{size(restored.bytes_compared)} (read from the disk)"))
    rows += [
        ("Bytes fetched", f"{size(restored.bytes_fetched)} (from the datastore, as stored)"),
        ("Bytes written", size(restored.bytes_written)),
    ]
    return rows


def job_state(job: operator_pb2.Job, now: float) -> dict[str, Any]:
    """What the job page's script updates while the job runs."""
    progress = job.progress
    return {
        "id": job.id,
        "status": job.status,
        "ended": JobStatus(job.status).ended,
        "phase": progress.phase,
        "bytes_done": progress.bytes_done,
        "bytes_total": progress.bytes_total,
        "bytes_read": size(job.bytes_read),
        "bytes_sent": size(job.bytes_sent),
        "bytes_stored": size(job.bytes_stored),
        "duration": duration(job, now),
        "error": f"{job.error_code}: {job.error_message}" if job.error_code else "",
    }


def render_problem(
    templates: jinja2.Environment, status: int, title: str, message: str, code: str = ""
) -> web.Response:
    page = templates.get_template("problem.html").render(
        title=title, message=message, code=code, status=status, session=None, csrf=""
    )
    return web.Response(status=status, text=page, content_type=HTML)


# --- the pages -------------------------------------------------------------------------------


class Pages:
    def __init__(
        self,
        calls: OperatorCalls,
        sessions: Sessions,
        links: SignInLinks,
        templates: jinja2.Environment,
        clock: Clock,
    ) -> None:
        self._calls = calls
        self._sessions = sessions
        self._links = links
        self.templates = templates
        self._clock = clock
        templates.globals.update(
            when=when, size=size, span=span, Operation=Operation, JobStatus=JobStatus
        )

    def add_routes(self, app: web.Application) -> None:
        g = self._guarded
        app.router.add_get("/", self.home)
        app.router.add_get("/login/{token}", g(self.login_page))
        app.router.add_post("/login/{token}", g(self.login))
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/vaults", g(self.vaults))
        app.router.add_get("/vaults/{vault}", g(self.dashboard))
        app.router.add_get("/vaults/{vault}/items", g(self.items))
        app.router.add_post("/vaults/{vault}/items/{vm}/backup", g(self.backup_now))
        app.router.add_get("/vaults/{vault}/policies", g(self.policies))
        app.router.add_get("/vms/{vm}/recovery-points", g(self.recovery_points))
        app.router.add_post("/vms/{vm}/restore", g(self.restore))
        app.router.add_get("/jobs", g(self.jobs))
        app.router.add_get("/jobs/{job}", g(self.job))
        app.router.add_get("/jobs/{job}/state", g(self.job_state))
        app.router.add_post("/jobs/{job}/cancel", g(self.cancel))
        app.router.add_get("/alerts", g(self.alerts))

    # --- plumbing ----------------------------------------------------------------------------

    def _guarded(
        self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """`handler`, with an API error shown as the CLI would show it."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except CofferError as error:
                status = HTTP_STATUS.get(error.grpc_status, 500)
                if request.path.endswith("/state"):
                    return web.json_response(
                        {"error": {"code": error.code, "message": error.message}}, status=status
                    )
                return self._page(
                    request,
                    "problem.html",
                    status=status,
                    title="Refused" if status in (401, 403) else "Error",
                    message=error.message,
                    code=error.code,
                )

        return guarded

    async def _call(self, request: web.Request, method: str, message: Message) -> Any:
        return await self._calls(request["session"], method, message, remote=request.remote or "")

    def _page(
        self, request: web.Request, template: str, *, status: int = 200, **values: Any
    ) -> web.Response:
        session: Session | None = request.get("session")
        page = self.templates.get_template(template).render(
            session=session,
            csrf=session.csrf if session else "",
            may_operate=session is not None and session.role.allows(OperatorRole.OPERATOR),
            path=request.path,
            **values,
        )
        return web.Response(status=status, text=page, content_type=HTML)

    @property
    def _now(self) -> float:
        return self._clock.now()

    # --- signing in and out ------------------------------------------------------------------

    async def home(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther("/vaults")

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        grant = self._links.check(request.match_info["token"])
        return self._page(
            request,
            "login.html",
            grant=grant,
            expires=datetime.fromtimestamp(grant.expires_at, UTC).isoformat(timespec="seconds"),
        )

    async def login(self, request: web.Request) -> web.StreamResponse:
        grant = self._links.redeem(request.match_info["token"])
        session = self._sessions.start(grant)
        response = web.HTTPSeeOther("/vaults")
        response.set_cookie(
            COOKIE,
            session.id,
            path="/",
            secure=True,
            httponly=True,
            samesite="Strict",
            max_age=int(self._sessions.lifetime),
        )
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        self._sessions.end(request["session"].id)
        response = self._page(
            request, "problem.html", title="Signed out", message="You are signed out.", code=""
        )
        response.del_cookie(COOKIE, path="/")
        return response

    # --- vaults ------------------------------------------------------------------------------

    async def vaults(self, request: web.Request) -> web.StreamResponse:
        reply = await self._call(request, "ListVaults", operator_pb2.ListVaultsRequest())
        return self._page(request, "vaults.html", vaults=list(reply.vaults))

    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["vault"]
        vault = await self._call(request, "GetVault", operator_pb2.VaultRef(name=name))
        board = await self._call(request, "Dashboard", operator_pb2.VaultRef(name=name))
        since = datetime.fromtimestamp(self._now - 86400, UTC).isoformat(timespec="seconds")
        return self._page(
            request,
            "dashboard.html",
            vault=vault,
            board=board,
            since=since,
            by_state=sorted(board.items_by_state.items()),
        )

    async def items(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["vault"]
        items: list[Any] = []
        token = ""
        while True:  # every page: the page shows the vault's items whole
            reply = await self._call(
                request, "ListItems", operator_pb2.ListItemsRequest(vault=name, page_token=token)
            )
            items += reply.items
            if not (token := reply.next_page_token):
                break
        policies = await self._call(request, "ListPolicies", operator_pb2.VaultRef(name=name))
        zones = {
            p.name: Policy.from_dict(json.loads(p.spec_json)).schedule.timezone
            for p in policies.policies
        }
        rows = [
            {
                "item": item,
                "zone": zones.get(item.policy, ""),
                "next": when(item.next_backup_at, zones.get(item.policy, "")),
                "protected": item.state.startswith("Protected") or item.state == "ProtectionError",
            }
            for item in items
        ]
        return self._page(request, "items.html", vault=name, rows=rows)

    async def backup_now(self, request: web.Request) -> web.StreamResponse:
        vault, vm = request.match_info["vault"], request.match_info["vm"]
        reply = await self._call(
            request, "BackupNow", operator_pb2.BackupNowRequest(vault=vault, vms=[vm])
        )
        raise web.HTTPSeeOther(f"/jobs/{reply.jobs[0].id}")

    async def policies(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["vault"]
        reply = await self._call(request, "ListPolicies", operator_pb2.VaultRef(name=name))
        return self._page(request, "policies.html", vault=name, policies=list(reply.policies))

    # --- recovery points and restores --------------------------------------------------------

    async def recovery_points(self, request: web.Request) -> web.StreamResponse:
        vm = request.match_info["vm"]
        reply = await self._call(
            request, "ListRecoveryPoints", operator_pb2.ListRecoveryPointsRequest(vm_id=vm)
        )
        points = list(reply.recovery_points)
        disks = sorted({d.name for p in points for d in p.disks})
        return self._page(request, "recovery_points.html", vm=vm, points=points, disks=disks)

    async def restore(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        fields = {
            key: str(form.get(key, "")).strip() for key in ("rp", "disk", "target", "target_vm")
        }
        if not fields["rp"] or not fields["disk"] or not fields["target"]:
            raise InvalidArgument(
                detail="choose a recovery point and a disk, and give a target path"
            )
        job = await self._call(
            request,
            "Restore",
            operator_pb2.RestoreRequest(
                vm_id=request.match_info["vm"],
                recovery_point_id=fields["rp"],
                disk=fields["disk"],
                target_path=fields["target"],
                target_vm_id=fields["target_vm"],
            ),
        )
        raise web.HTTPSeeOther(f"/jobs/{job.id}")

    # --- jobs --------------------------------------------------------------------------------

    async def jobs(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        chosen = {
            key: query.get(key, "").strip()
            for key in ("status", "operation", "vault", "vm", "from", "to")
        }
        limit = int(query.get("limit", "50")) if query.get("limit", "50").isdigit() else 50
        message = operator_pb2.ListJobsRequest(
            status=[chosen["status"]] if chosen["status"] else [],
            operation=[chosen["operation"]] if chosen["operation"] else [],
            vault=chosen["vault"],
            vm_id=chosen["vm"],
            limit=min(max(limit, 1), 10000),
        )
        for key, field in (("from", "started_from"), ("to", "started_to")):
            if chosen[key]:
                getattr(message, field).CopyFrom(_timestamp(chosen[key]))
        reply = await self._call(request, "ListJobs", message)
        vaults = await self._call(request, "ListVaults", operator_pb2.ListVaultsRequest())
        return self._page(
            request,
            "jobs.html",
            jobs=list(reply.jobs),
            chosen=chosen,
            limit=limit,
            limits=JOB_LIMITS,
            statuses=[s.value for s in JobStatus],
            operations=[o.value for o in Operation],
            vault_names=[v.name for v in vaults.vaults],
            duration=lambda job: duration(job, self._now),
        )

    async def _job(self, request: web.Request) -> operator_pb2.Job:
        reply: operator_pb2.Job = await self._call(
            request, "GetJob", operator_pb2.GetJobRequest(id=request.match_info["job"])
        )
        return reply

    async def job(self, request: web.Request) -> web.StreamResponse:
        job = await self._job(request)
        details = json.loads(job.details_json or "{}")
        return self._page(
            request,
            "job.html",
            job=job,
            state=job_state(job, self._now),
            details=restore_rows(job) + flatten(details),
            ended=JobStatus(job.status).ended,
        )

    async def job_state(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(job_state(await self._job(request), self._now))

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        job = await self._call(
            request, "CancelJob", operator_pb2.GetJobRequest(id=request.match_info["job"])
        )
        raise web.HTTPSeeOther(f"/jobs/{job.id}")

    # --- alerts ------------------------------------------------------------------------------

    async def alerts(self, request: web.Request) -> web.StreamResponse:
        reply = await self._call(
            request, "ListAlerts", operator_pb2.ListAlertsRequest(include_resolved=True, limit=200)
        )
        alerts = list(reply.alerts)
        return self._page(
            request,
            "alerts.html",
            firing=[a for a in alerts if a.state == "firing"],
            resolved=[a for a in alerts if a.state != "firing"],
        )


def _timestamp(text: str) -> Timestamp:
    """A time from a form (`datetime-local` gives no offset: read as UTC)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(detail=f"{text!r} is not an ISO 8601 date or time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    stamp = Timestamp()
    stamp.FromDatetime(moment.astimezone(UTC))
    return stamp
