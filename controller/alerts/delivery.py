"""Where alerts go besides MQTT and the catalog: webhooks (JSON POST) and e-mail (SMTP).

Each channel (every webhook, the mail server) has its own bounded queue and its own task, so
a slow or dead receiver delays nothing else: the keeper only queues. A notice is tried up to
the channel's `max_attempts` times with exponential backoff and jitter (shared/backoff.py),
each attempt within its `timeout`. A receiver's 5xx, 429, a timeout or a refused connection is
tried again; any other 4xx is the receiver refusing this notice, logged and not repeated. A
full queue drops its oldest notice (logged): the catalog, `coffer alerts` and MQTT still have
every alert, so a notice lost to a dead receiver is never the only record.

Mail goes through the standard library's `smtplib` in a thread (no extra dependency; one
message at a time per controller is all alerts need).
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, Final

import aiohttp

from controller.config import AlertSettings, EmailSettings, WebhookSettings
from shared.backoff import Backoff
from shared.supervision import Policy, Supervisor
from shared.version import coffer_version

log = logging.getLogger(__name__)

# The first retry after a second, then doubling to at most a minute.
RETRY: Final = Backoff(first=1.0, cap=60.0, jitter="equal")
QUEUE_SIZE: Final = 1000


@dataclass(frozen=True)
class Notice:
    """An alert that was raised or resolved, as receivers get it (JSON for webhooks)."""

    document: dict[str, Any]

    @property
    def subject(self) -> str:
        d = self.document
        state = "FIRING" if d["state"] == "firing" else "RESOLVED"
        return f"[coffer] {state} {d['severity']}: {d['kind']} {d['subject']}"

    @property
    def text(self) -> str:
        d = self.document
        lines = [d["summary"], ""]
        lines += [f"{key}: {d[key]}" for key in ("state", "kind", "severity", "vault", "item")]
        lines += [f"raised at: {d['raised_at']}"]
        if d.get("resolved_at"):
            lines += [f"resolved at: {d['resolved_at']}"]
        lines += [f"{key}: {value}" for key, value in (d.get("details") or {}).items()]
        lines += ["", "See `coffer alerts`, or the web console's Alerts page."]
        return "\n".join(lines)


class Refused(Exception):
    """The receiver refused the notice for good (a 4xx other than 429)."""


Send = Callable[[Notice], Awaitable[None]]


class Channel:
    """One receiver: a queue and the task that empties it."""

    def __init__(self, name: str, send: Send, max_attempts: int, retry: Backoff = RETRY):
        self.name = name
        self._send = send
        self._max_attempts = max_attempts
        self._retry = retry
        self._queue: asyncio.Queue[Notice] = asyncio.Queue(QUEUE_SIZE)
        self.delivered = 0
        self.failed = 0

    def put(self, notice: Notice) -> None:
        if self._queue.full():
            dropped = self._queue.get_nowait()
            log.error("alert channel %s: queue full, dropped %s", self.name, dropped.subject)
        self._queue.put_nowait(notice)

    async def run(self) -> None:
        while True:
            notice = await self._queue.get()
            await self._deliver(notice)

    async def _deliver(self, notice: Notice) -> None:
        delays = self._retry.delays()
        for attempt in range(1, self._max_attempts + 1):
            try:
                await self._send(notice)
            except Refused as refused:
                log.error("alert channel %s refused %s: %s", self.name, notice.subject, refused)
                self.failed += 1
                return
            except (aiohttp.ClientError, OSError, smtplib.SMTPException, TimeoutError) as exc:
                if attempt == self._max_attempts:
                    log.error(
                        "alert channel %s: %s not delivered after %d attempts: %s",
                        self.name, notice.subject, attempt, _describe(exc),
                    )  # fmt: skip
                    self.failed += 1
                    return
                delay = next(delays)
                log.warning(
                    "alert channel %s: attempt %d of %s failed (%s); again in %.1f s",
                    self.name, attempt, notice.subject, _describe(exc), delay,
                )  # fmt: skip
                await asyncio.sleep(delay)
            else:
                self.delivered += 1
                log.info("alert channel %s: delivered %s", self.name, notice.subject)
                return


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def webhook_sender(settings: WebhookSettings, session: aiohttp.ClientSession) -> Send:
    timeout = aiohttp.ClientTimeout(total=settings.timeout)

    async def send(notice: Notice) -> None:
        async with session.post(settings.url, json=notice.document, timeout=timeout) as reply:
            if reply.status == 429 or reply.status >= 500:
                raise aiohttp.ClientResponseError(
                    reply.request_info, (), status=reply.status, message=reply.reason or ""
                )
            if reply.status >= 400:
                raise Refused(f"HTTP {reply.status} {reply.reason}")

    return send


def email_sender(settings: EmailSettings) -> Send:
    password = (
        settings.password_file.read_text().splitlines()[0] if settings.password_file else None
    )

    def send_now(notice: Notice) -> None:
        message = EmailMessage()
        message["Subject"] = notice.subject
        message["From"] = settings.sender
        message["To"] = ", ".join(settings.to)
        message.set_content(notice.text)
        with smtplib.SMTP(settings.host, settings.port, timeout=settings.timeout) as smtp:
            if settings.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if settings.username and password is not None:
                smtp.login(settings.username, password)
            refused = smtp.send_message(message)
        if refused:
            raise Refused(f"recipients refused: {', '.join(refused)}")

    async def send(notice: Notice) -> None:
        try:
            await asyncio.to_thread(send_now, notice)
        except smtplib.SMTPRecipientsRefused as exc:
            raise Refused(f"recipients refused: {', '.join(exc.recipients)}") from exc

    return send


class Delivery:
    """Every configured channel; `notify` queues a notice on each. An async context manager
    whose channel tasks run under the controller's supervisor."""

    def __init__(self, settings: AlertSettings, supervisor: Supervisor) -> None:
        self._settings = settings
        self._supervisor = supervisor
        self._session: aiohttp.ClientSession | None = None
        self.channels: list[Channel] = []

    async def __aenter__(self) -> Delivery:
        settings = self._settings
        if settings.webhooks:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": f"coffer-controller/{coffer_version()}"}
            )
        for n, hook in enumerate(settings.webhooks, start=1):
            assert self._session is not None
            self.channels.append(
                Channel(f"webhook-{n}", webhook_sender(hook, self._session), hook.max_attempts)
            )
        if settings.email is not None:
            self.channels.append(
                Channel("email", email_sender(settings.email), settings.email.max_attempts)
            )
        for channel in self.channels:
            # RESTART: a channel's loop only fails on a bug; its queue survives the restart.
            self._supervisor.start(f"alerts-{channel.name}", channel.run, policy=Policy.RESTART)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for channel in self.channels:
            await self._supervisor.stop(f"alerts-{channel.name}")
        if self._session is not None:
            await self._session.close()

    def notify(self, notice: Notice) -> None:
        for channel in self.channels:
            channel.put(notice)
