"""The web console: the vault workflow in a browser, served by the controller over HTTPS.

Off by default; `[web] listen = "HOST:PORT"` turns it on (README "The web console").

    server.py   the HTTPS listener (aiohttp in the controller's event loop), its certificate,
                security headers, the session and CSRF checks every request passes
    signin.py   one-time, signed, short-lived sign-in links from `coffer web login`, and the
                server-side sessions they start
    calls.py    every page and action is an operator RPC of the same OperatorService, called
                through the gRPC edge's own identity, role and audit checks
    pages.py    the pages and actions; templates/ (Jinja2, everything escaped) and static/
                (one stylesheet, one script: a running job's page follows it live)

Nothing is built for the front end: server-rendered HTML, a little JavaScript that only
improves what works without it.
"""

from controller.web.calls import OperatorCalls
from controller.web.server import WebConsole

__all__ = ["OperatorCalls", "WebConsole"]
