"""Signing in to the web console: one-time links and the sessions they start.

Operators are the holders of operator certificates, and browsers are bad at client
certificates, so the certificate vouches for the browser once: `coffer web login` (the
`CreateWebLogin` RPC, any role) makes a **sign-in link** bound to the calling certificate, its
name, role and serial. The link:

- is **signed**: `ID.EXPIRES.MAC`, the MAC an HMAC-SHA256 over `ID.EXPIRES` with a key this
  controller process made at start (links die with the process, as sessions do), so a link
  that was altered or made up is refused before anything is looked up;
- is **short-lived** (`[web] login_link_seconds`, 5 minutes by default, at most an hour);
- is **single use**: opening it shows who it signs in as and a button; the POST of that form
  redeems it, and a second redeem is refused (`WebLoginUsed`). A link only looked at (a chat
  preview, a mail scanner) is not spent.

Redeeming starts a **session**: a random id in a cookie (`__Host-coffer-session`: HttpOnly,
Secure, SameSite=Strict, Path=/), held server side with the certificate it came from, a
CSRF token, an absolute lifetime (`session_minutes`) and an idle timeout (`idle_minutes`).
Every request of the session acts with that certificate (controller.web.calls), so a revoked
certificate ends what its sessions may do at once, and the role is the certificate's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from controller.access import LEGACY_ROLE
from shared.clock import Clock
from shared.errors import WebLoginExpired, WebLoginInvalid, WebLoginUsed
from shared.tls import OperatorRole, certificate_facts

COOKIE: Final = "__Host-coffer-session"
# Links redeemed are remembered this long past their expiry, to say "used" rather than
# "expired" of a link used a moment ago (after that, "expired" is true too).
_REMEMBER_USED: Final = 3600.0


@dataclass(frozen=True)
class Grant:
    """What a sign-in link stands for: the certificate that asked for it."""

    link_id: str
    operator: str
    role: OperatorRole
    serial: str
    pem: bytes
    expires_at: float


def _mac(key: bytes, text: str) -> str:
    digest = hmac.new(key, text.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _when(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")


class SignInLinks:
    """Makes, checks and redeems sign-in links."""

    def __init__(self, clock: Clock, key: bytes | None = None) -> None:
        self._clock = clock
        self._key = key or secrets.token_bytes(32)
        self._pending: dict[str, Grant] = {}
        self._used: dict[str, tuple[float, float]] = {}  # id → (used at, expired at)

    def issue(self, pem: bytes, lifetime: float) -> tuple[str, Grant]:
        """A link token for the holder of the certificate `pem`, and what it grants."""
        now = self._clock.now()
        self._forget_old(now)
        facts = certificate_facts(pem)
        link_id = secrets.token_urlsafe(18)
        expires = int(now + lifetime)
        grant = Grant(
            link_id=link_id,
            operator=facts.identity.name,
            role=facts.operator_role or LEGACY_ROLE,
            serial=facts.serial_hex,
            pem=pem,
            expires_at=float(expires),
        )
        self._pending[link_id] = grant
        payload = f"{link_id}.{expires}"
        return f"{payload}.{_mac(self._key, payload)}", grant

    def check(self, token: str) -> Grant:
        """What `token` grants, if it can still be redeemed; WebLoginInvalid, WebLoginExpired
        or WebLoginUsed if not. Redeems nothing."""
        link_id, expires = self._verified(token)
        now = self._clock.now()
        used = self._used.get(link_id)
        if used is not None:
            raise WebLoginUsed(used=_when(used[0]))
        if now >= expires:
            raise WebLoginExpired(expired=_when(expires))
        grant = self._pending.get(link_id)
        if grant is None:  # signed by us, but not known: from before a restart of the process
            raise WebLoginInvalid(detail="it is not one this controller issued")
        return grant

    def redeem(self, token: str) -> Grant:
        """`check`, then spend the link: it never grants again."""
        grant = self.check(token)
        del self._pending[grant.link_id]
        self._used[grant.link_id] = (self._clock.now(), grant.expires_at)
        return grant

    def _verified(self, token: str) -> tuple[str, float]:
        parts = token.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            raise WebLoginInvalid(detail="it is not a sign-in link")
        link_id, expires, mac = parts
        if not hmac.compare_digest(_mac(self._key, f"{link_id}.{expires}"), mac):
            raise WebLoginInvalid(detail="its signature does not match (altered, or made up)")
        return link_id, float(expires)

    def _forget_old(self, now: float) -> None:
        for link_id, grant in list(self._pending.items()):
            if grant.expires_at <= now:
                del self._pending[link_id]
        for link_id, (_, expired) in list(self._used.items()):
            if expired + _REMEMBER_USED <= now:
                del self._used[link_id]


@dataclass
class Session:
    """A signed-in browser."""

    id: str
    grant: Grant
    started_at: float
    last_seen: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    @property
    def operator(self) -> str:
        return self.grant.operator

    @property
    def role(self) -> OperatorRole:
        return self.grant.role


class Sessions:
    """The signed-in browsers, server side."""

    def __init__(self, clock: Clock, lifetime: float, idle: float) -> None:
        self._clock = clock
        self._lifetime = lifetime
        self._idle = idle
        self._sessions: dict[str, Session] = {}

    @property
    def lifetime(self) -> float:
        return self._lifetime

    def start(self, grant: Grant) -> Session:
        now = self._clock.now()
        for session_id in [s.id for s in self._sessions.values() if self._over(s, now)]:
            del self._sessions[session_id]
        session = Session(secrets.token_urlsafe(32), grant, now, now)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session of a cookie's value (None: no session, or it ended); a request
        of it keeps it from idling out."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock.now()
        if self._over(session, now):
            del self._sessions[session_id]
            return None
        session.last_seen = now
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def _over(self, session: Session, now: float) -> bool:
        return now - session.started_at >= self._lifetime or now - session.last_seen >= self._idle

    def __len__(self) -> int:
        return len(self._sessions)
