"""The served app's front door: which HTTP routes exist, which need the login, and from where.

Contract: ``Gate`` is a pure ASGI middleware placed in front of every route of the FastAPI app Gradio builds
(``launch(app_kwargs={"middleware": gate_middleware(...)})``).  For each request it decides, by method and path,
before any Gradio code runs:

- ``PUBLIC`` routes (the login page, the login form, the frontend's static files) answer everyone;
- ``LOGIN`` routes (what the studio's page and ``gradio_client`` use: config, API info, the queue, uploads,
  files, heartbeats) answer only a logged-in browser when a password is set: 401 otherwise;
- every other route Gradio registers (run history and its Hub buckets, MCP, monitoring, deep links, the
  proxy, media streams, custom components, vibe editing, PWA files, the legacy ``/api`` and ``/run``
  predict routes, FastAPI's own ``/openapi.json``) and any unknown path answers 404 to everyone: the studio
  does not use them, so they do nothing.
- Failed logins are counted per client address: after ``LOGIN_TRIES`` within ``LOGIN_WINDOW_S`` seconds every
  login attempt from it answers 429 until the window has passed (a password cannot be guessed at speed).
- On a loopback bind the ``Host`` header must name the loopback (or a name in ``STUDIO_ALLOWED_HOSTS``) so
  a DNS-rebinding page cannot drive the studio, and a request whose ``Origin`` is another site is refused.
- The login page a logged-out browser gets carries no API description (Gradio embeds it in the page);
  ``/gradio_api/startup-events`` answers without a login only to ``launch()``'s own first call.
- Every answer the gate gives itself carries the ``x-studio-gate: refused`` header: no route of the app ran.

The login check is Gradio's own (its session cookie, looked up in the app's token table), so logging in
and out work unchanged.  This module knows routes, not the engine.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import defaultdict, deque
from urllib.parse import urlsplit

API = "/gradio_api"

# (methods, path regex).  Paths are those Starlette routes on: percent-decoded, before any normalisation,
# so a path that differs by a slash, a dot segment or case simply matches nothing and is refused.
PUBLIC = [
    ({"GET"}, r"/"),
    ({"POST"}, r"/login/?"),
    ({"GET"}, r"/logout"),
    ({"GET"}, r"/(assets|svelte|static)/[^\x00]*"),
    ({"GET"}, r"/favicon\.ico|/robots\.txt|/theme\.css|/gradio_api/theme\.css"),
    ({"GET"}, r"/gradio_api/login_check/?"),  # says only whether this browser is logged in
]
LOGIN = [
    ({"GET"}, r"/config/?"),
    ({"GET"}, r"/gradio_api/(info/?|openapi\.json)"),  # the "Use via API" page and gradio_client
    ({"GET"}, r"/gradio_api/(user|app_id)/?"),
    # launch() itself calls it once, without a login, to run the startup events (see Gate.__call__).
    ({"GET"}, r"/gradio_api/startup-events"),
    ({"GET"}, r"/gradio_api/heartbeat/[^/]+"),
    ({"POST"}, r"/gradio_api/queue/join"),
    ({"GET"}, r"/gradio_api/queue/(data|status)"),
    ({"POST"}, r"/gradio_api/(cancel|reset/?)"),
    ({"POST"}, r"/gradio_api/upload"),
    ({"GET"}, r"/gradio_api/upload_progress"),
    ({"GET"}, r"/gradio_api/file=[^\x00]+"),
    ({"POST"}, r"/gradio_api/call/(v2/)?[A-Za-z0-9_-]+/?"),  # the curl API the "Use via API" page shows
    ({"GET"}, r"/gradio_api/call/(v2/)?[A-Za-z0-9_-]+/[A-Za-z0-9_-]+"),
]
_PUBLIC = [(m, re.compile(p)) for m, p in PUBLIC]
_LOGIN = [(m, re.compile(p)) for m, p in LOGIN]
LOGIN_TRIES, LOGIN_WINDOW_S = 10, 60.0
GATE_HEADER = "x-studio-gate"  # on every answer the gate gives itself: no route of the app ran
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def classify(method: str, path: str) -> str:
    """``public``, ``login`` or ``off`` for a request's method and (decoded) path."""
    method = "GET" if method == "HEAD" else method  # a HEAD is read as its GET
    for table, kind in ((_PUBLIC, "public"), (_LOGIN, "login")):
        for methods, rx in table:
            if method in methods and rx.fullmatch(path):
                return kind
    # A real CORS preflight never gets here: Gradio's CORS middleware, outside the gate, answers it.
    return "off"


def _host_of(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Gate:
    def __init__(self, app, loopback: bool = True):
        self.app = app
        self.loopback = loopback
        extra = {h.strip().lower() for h in os.environ.get("STUDIO_ALLOWED_HOSTS", "").split(",") if h.strip()}
        self.extra = extra
        self.hosts = LOOPBACK_HOSTS | extra
        self.failed_logins: dict[str, deque] = defaultdict(deque)

    def _same_site(self, origin: str, host: str) -> bool:
        # "null" (a sandboxed frame, a file:// page) is another site too.
        netloc = urlsplit(origin).netloc.lower() if origin != "null" else ""
        return bool(netloc) and (netloc == host.lower() or _host_of(netloc) in self.extra)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        kind = classify(scope.get("method", "GET"), path) if scope["type"] == "http" else "off"
        if kind == "off":
            return await _reply(scope, send, 404, {"detail": "Not Found"})
        if self.loopback and _host_of(headers.get("host", "")) not in self.hosts:
            return await _reply(scope, send, 403, {"detail": "this studio answers only on its loopback address"})
        origin = headers.get("origin")
        if origin is not None and not self._same_site(origin, headers.get("host", "")):
            return await _reply(scope, send, 403, {"detail": "cross-site requests are refused"})
        if scope.get("method") == "POST" and path.rstrip("/") == "/login":
            return await self._login(scope, receive, send)
        logged_in = _logged_in(scope["app"], headers)
        if path == "/gradio_api/startup-events" and not getattr(scope["app"], "startup_events_triggered", True):
            logged_in = True  # launch()'s own call, before anyone is served
        if kind == "login" and not logged_in:
            return await _reply(scope, send, 401, {"detail": {"error": "Not authenticated"}})
        if path == "/" and not logged_in:
            # Gradio's login page embeds the whole API description (endpoint names, parameters, server paths).
            return await self.app(scope, receive, _without_api_info(send))
        return await self.app(scope, receive, send)


    async def _login(self, scope, receive, send):
        client = (scope.get("client") or ("?", 0))[0]
        tries, now = self.failed_logins[client], time.monotonic()
        while tries and now - tries[0] > LOGIN_WINDOW_S:
            tries.popleft()
        if len(tries) >= LOGIN_TRIES:
            return await _reply(scope, send, 429, {"detail": "too many failed logins; wait a minute and try again"})

        async def counting(message):
            if message["type"] == "http.response.start" and message["status"] != 200:
                tries.append(time.monotonic())
            await send(message)

        return await self.app(scope, receive, counting)


def _logged_in(app, headers: dict) -> bool:
    if getattr(app, "auth", None) is None and getattr(app, "auth_dependency", None) is None:
        return True  # no password: a loopback-only studio (app.py refuses anything else)
    cookies = {}
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        cookies[name] = value
    cid = app.cookie_id
    token = cookies.get(f"access-token-{cid}") or cookies.get(f"access-token-unsecure-{cid}")
    return bool(token) and token in app.tokens


_API_INFO = re.compile(rb"window\.gradio_api_info = .*?;</script>", re.DOTALL)


def _without_api_info(send):
    """A ``send`` that holds the page's body and blanks ``window.gradio_api_info`` before it leaves."""
    start, chunks = {}, []

    async def wrapped(message):
        if message["type"] == "http.response.start":
            start.update(message)
            return
        if message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = _API_INFO.sub(b'window.gradio_api_info = {"named_endpoints": {}, "unnamed_endpoints": {}};</script>',
                             b"".join(chunks))
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return wrapped


async def _reply(scope, send, status: int, body: dict):
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (GATE_HEADER.encode(), b"refused")]})
    await send({"type": "http.response.body", "body": data})


def gate_middleware(loopback: bool) -> list:
    from starlette.middleware import Middleware

    return [Middleware(Gate, loopback=loopback)]
