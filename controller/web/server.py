"""The web console's HTTPS listener: its middlewares, its certificate, its lifecycle.

An aiohttp application served in the controller's own event loop (docs/decisions.md says why
aiohttp), on `[web] listen`, with TLS: the controller's certificate from its CA (reloaded
when the controller renews it) unless `cert_file`/`key_file` name one browsers already trust.

Every response carries the security headers (a Content-Security-Policy that allows scripts,
styles and connections to this origin only and no inline script at all, no framing, no
referrer to other sites: a sign-in link's token is in its path, HSTS, nosniff) and
`Cache-Control: no-store`.
Every request but the sign-in pages and the static files needs a live session (else 401), and
every POST must carry the session's CSRF token in its form (else 403) and must not come from
another site (`Sec-Fetch-Site`, `Origin`). The access log is our own line per request, with a
sign-in link's token left out.
"""

from __future__ import annotations

import hmac
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import jinja2
from aiohttp import web

from controller.config import WebSettings
from controller.web.calls import OperatorCalls
from controller.web.pages import Pages, render_problem
from controller.web.signin import COOKIE, Grant, Sessions, SignInLinks
from shared.address import parse_address
from shared.clock import Clock
from shared.errors import Unavailable
from shared.tls import TlsFiles

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not no-referrer: Chromium then sends `Origin: null` with the console's own forms.
    "Referrer-Policy": "same-origin",
    "Strict-Transport-Security": "max-age=31536000",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    "Cache-Control": "no-store",
}
# Paths served without a session.
PUBLIC_PREFIXES: Final = ("/login/", "/static/")
# Form fields are small; a body past this is refused before it is read.
MAX_BODY: Final = 64 * 1024


class WebConsole:
    """The console: an async context manager serving it on `settings.listen`."""

    def __init__(
        self,
        settings: WebSettings,
        calls: OperatorCalls,
        clock: Clock,
        controller_tls: TlsFiles,
        advertise_host: str | None = None,
    ) -> None:
        self.settings = settings
        self._calls = calls
        self._clock = clock
        self._tls = controller_tls
        self._advertise_host = advertise_host
        self.links = SignInLinks(clock)
        self.sessions = Sessions(
            clock, settings.session_minutes * 60.0, settings.idle_minutes * 60.0
        )
        self.port = 0
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        self._runner: web.AppRunner | None = None
        templates = jinja2.Environment(
            loader=jinja2.PackageLoader("controller.web", "templates"),
            autoescape=True,  # every value is escaped: names come from agents, untrusted
            undefined=jinja2.StrictUndefined,
        )
        self._pages = Pages(calls, self.sessions, self.links, templates, clock)

    # --- lifecycle ---------------------------------------------------------------------------

    def load_certificate(self) -> None:
        """(Re)load the served certificate; the next handshakes use it."""
        if self.settings.cert_file is not None and self.settings.key_file is not None:
            self._ssl.load_cert_chain(self.settings.cert_file, self.settings.key_file)
        else:
            self._ssl.load_cert_chain(self._tls.cert, self._tls.key)

    async def __aenter__(self) -> WebConsole:
        self.load_certificate()
        app = web.Application(
            middlewares=[self._headers, self._access_log, self._signed_in, self._csrf],
            client_max_size=MAX_BODY,
        )
        self._pages.add_routes(app)
        static = Path(str(resources.files("controller.web") / "static"))
        app.router.add_static("/static/", static, append_version=False)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        address = parse_address(self.settings.listen, allow_port_zero=True)
        site = web.TCPSite(runner, address.host, address.port, ssl_context=self._ssl)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise Unavailable(
                f"cannot listen on {self.settings.listen} for the web console: "
                f"{exc.strerror or exc} (`listen` in [web] of the controller config)"
            ) from exc
        self._runner = runner
        server = site._server  # aiohttp keeps the bound sockets there
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else address.port
        log.info("web console on %s", self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        """The console's address, as operators open it."""
        if self.settings.url:
            return self.settings.url
        host = (
            self._advertise_host or parse_address(self.settings.listen, allow_port_zero=True).host
        )
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"https://{host}:{self.port}"

    def sign_in_link(self, pem: bytes, expires_seconds: float) -> tuple[str, Grant]:
        """A one-time link for the holder of certificate `pem`."""
        lifetime = expires_seconds or self.settings.login_link_seconds
        token, grant = self.links.issue(pem, lifetime)
        return f"{self.url}/login/{token}", grant

    def issue_link(self, pem: bytes, expires_seconds: float) -> tuple[str, float, str, str]:
        """`sign_in_link` for the operator API: its URL, expiry, operator and role."""
        url, grant = self.sign_in_link(pem, expires_seconds)
        return url, grant.expires_at, grant.operator, str(grant.role)

    # --- middlewares -------------------------------------------------------------------------

    @web.middleware
    async def _headers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        response.headers.update(SECURITY_HEADERS)
        if request.path.startswith("/static/"):
            response.headers["Cache-Control"] = "max-age=300"
        return response

    @web.middleware
    async def _access_log(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        began = time.monotonic()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            path = "/login/(link)" if request.path.startswith("/login/") else request.path
            session = request.get("session")
            log.info(
                "web %s %s %s %d %.0f ms%s",
                request.remote,
                request.method,
                path,
                status,
                (time.monotonic() - began) * 1000,
                f" ({session.operator})" if session is not None else "",
            )

    @web.middleware
    async def _signed_in(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(PUBLIC_PREFIXES):
            return await handler(request)
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is None:
            return render_problem(
                self._pages.templates,
                401,
                "Not signed in",
                "This page needs a session. Run `coffer web login` and open the link it "
                "prints (it works once, for a few minutes).",
            )
        request["session"] = session
        return await handler(request)

    @web.middleware
    async def _csrf(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in ("GET", "HEAD") or request.path.startswith("/login/"):
            return await handler(request)
        if request.method != "POST":
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])
        session = request["session"]
        form = await request.post()
        token = form.get("csrf")
        site = request.headers.get("Sec-Fetch-Site", "same-origin")
        origin = request.headers.get("Origin")
        same_origin = origin is None or urlsplit(origin).netloc == request.host
        if (
            not isinstance(token, str)
            or not hmac.compare_digest(token, session.csrf)
            or site not in ("same-origin", "none")
            or not same_origin
        ):
            log.warning(
                "web: refused a POST to %s from %s without a valid CSRF token or from "
                "another site (session of %s; token %s, Sec-Fetch-Site %s, Origin %s)",
                request.path, request.remote, session.operator,
                "given" if isinstance(token, str) else "missing", site, origin,
            )  # fmt: skip
            return render_problem(
                self._pages.templates,
                403,
                "Refused",
                "This action came without this session's form token (or from another "
                "site). Reload the page and try again.",
            )
        return await handler(request)
