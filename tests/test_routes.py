"""Nobody in without the password: every route of the served app, asked with and without a login.

The app is served the way ``python app.py`` serves it (``app.main([...], block=False)``: the same launch
arguments, the same gate) on a free loopback port, with ``STUDIO_PASSWORD`` set.  The routes are read from
the real FastAPI app Gradio builds (``demo.server_app``), each path parameter filled with a value that
would act if the request got through (the ``start`` endpoint, a file in the runs root, a session), and
each route is requested with every method it takes, without a login and with one.  Known Gradio routes
the studio turns off (run history and its Hub buckets, MCP, monitoring, ...) are asked too, and path
variants (double slashes, dot segments, case, encodings) of the guarded ones.

Without a login, a guarded or turned-off route must be answered by the gate itself (its header says so:
no handler of the app ran), and the public ones (login page, static files) must give away nothing: no
config, no endpoint names, no run names, no token.  The studio home must not change.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import urllib.parse
from pathlib import Path

import pytest

from conftest import CANARY
from e2e_helpers import free_port

from studio.ui.gate import GATE_HEADER, classify

PASSWORD = "correct-horse-battery"
GRADIO_ROUTES_OFF = [  # routes Gradio registers when its features are on; the studio keeps them off
    ("GET", "/gradio_api/runs"), ("GET", "/gradio_api/runs/"),
    ("POST", "/gradio_api/run-history/connect"), ("GET", "/gradio_api/run-history/buckets"),
    ("GET", "/gradio_api/run-history/records"), ("GET", "/gradio_api/run-history/records/start/r1/assets/a1"),
    ("GET", "/gradio_api/mcp/sse"), ("POST", "/gradio_api/mcp/messages/"), ("GET", "/gradio_api/mcp/schema"),
    ("POST", "/gradio_api/mcp/"), ("GET", "/gradio_api/mcp"),
    ("GET", "/monitoring"), ("GET", "/monitoring/summary"), ("GET", "/monitoring/abc"),
    ("GET", "/gradio_api/deep_link?session_hash=abc"), ("GET", "/gradio_api/token"), ("GET", "/gradio_api/dev/reload"),
    ("GET", "/gradio_api/proxy=https://x.hf.space/etc"), ("GET", "/gradio_api/file/etc/passwd"),
    ("POST", "/gradio_api/api/start"), ("POST", "/gradio_api/run/start"), ("POST", "/gradio_api/run/predict"),
    ("POST", "/gradio_api/component_server"), ("POST", "/gradio_api/process_recording"),
    ("POST", "/gradio_api/vibe-edit"), ("GET", "/gradio_api/vibe-code"), ("POST", "/gradio_api/undo-vibe-edit"),
    ("POST", "/gradio_api/stream/e1"), ("GET", "/gradio_api/stream/s/0/1/playlist.m3u8"),
    ("GET", "/gradio_api/custom_component/x/client/js/index.js"), ("GET", "/manifest.json"), ("GET", "/pwa_icon"),
    ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/gradio_api/docs"),
    ("GET", "/login/huggingface"), ("GET", "/login/callback"), ("GET", "/gradio_api/oauth/scopes"),
    ("PUT", "/config"), ("DELETE", "/gradio_api/queue/join"), ("PATCH", "/gradio_api/upload"),
]
VARIANTS = [  # spellings of guarded routes that must not slip past the gate
    "//config", "/config/../config", "/./config", "/CONFIG", "/Config", "/config%2F", "/%63onfig", "/config;x",
    "//gradio_api/info", "/gradio_api//info", "/gradio_api/./info", "/gradio_api/x/../info", "/GRADIO_API/info",
    "/gradio_api/info%00", "/gradio_api/queue/join/", "/gradio_api/queue//join", "/gradio_api/%71ueue/join",
    "/gradio_api/upload/", "/gradio_api/heartbeat/", "/gradio_api/file%3D/etc/passwd",
    "/gradio_api/run-history/buckets/", "/gradio_api/run-history//buckets", "/gradio_api/RUN-HISTORY/buckets",
    "/assets/../config", "/assets/..%2F..%2Fconfig", "/static/../gradio_api/info", "/svelte/../config",
]


def _request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})  # the path goes out byte for byte
        r = conn.getresponse()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
    finally:
        conn.close()


def _tree(home: Path) -> dict:
    return {str(p.relative_to(home)): (p.stat().st_size if p.is_file() else -1) for p in home.rglob("*")}


@pytest.fixture(scope="module")
def app_with_password(tmp_path_factory):
    """The studio served with ``STUDIO_PASSWORD``, a finished-looking run in its home and a file under its runs
    root; yields the port, the home, the Blocks and a logged-in cookie."""
    import app

    home = tmp_path_factory.mktemp("routes_home")
    run_dir = home / "runs" / "secret-run-name"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: tiny-demo\n")
    (run_dir / "events.jsonl").write_text('{"t": 1, "type": "status", "status": "created"}\n')
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_HOME", str(home))
        mp.setenv("STUDIO_PASSWORD", PASSWORD)
        mp.setenv("STUDIO_USERNAME", "ana")
        mp.setenv("STUDIO_CONFINE_PATHS", "1")  # app.main sets it; the context restores it afterwards
        mp.setenv("GRADIO_TEMP_DIR", str(home / "gradio_tmp"))
        demo = app.main(["--port", str(port)], block=False)
        try:
            status, headers, _ = _request(port, "POST", "/login", f"username=ana&password={PASSWORD}".encode(),
                                          {"Content-Type": "application/x-www-form-urlencoded"})
            assert status == 200, status
            cookie = "; ".join(c.split(";")[0] for c in headers["set-cookie"].split(", ")
                               if c.startswith("access-token"))
            yield {"port": port, "home": home, "demo": demo, "cookie": cookie, "run_file": run_dir / "config.yaml"}
        finally:
            demo.close()


def _routes(server_app) -> list[tuple[str, str]]:
    """(method, path template) of every route the app serves, included routers and mounts flattened."""
    from fastapi.routing import iter_route_contexts
    from starlette.routing import Mount

    out = []

    def walk(routes, prefix=""):
        for rc in iter_route_contexts(routes):
            route = rc.original_route
            if isinstance(route, Mount):
                walk(route.routes or [], prefix + rc.path)
                continue
            for method in sorted(getattr(route, "methods", None) or {"GET"}):
                out.append((method, prefix + rc.path))

    walk(server_app.routes)
    return out


def _fill(template: str, run_file: Path) -> str:
    """A concrete path for a route template, with values that would act if the request got through."""
    values = {"api_name": "start", "path_or_url": str(run_file), "path": "index.html", "session_hash": "abc123",
              "event_id": "e1", "url_path": "https://x.hf.space/y", "size": "192", "key": "abc", "page": "",
              "id": "x", "environment": "client", "type": "js", "file_name": "index.js", "run": "0",
              "component_id": "1", "segment_id": "0", "ext": "ts", "endpoint": "start", "record_id": "r1",
              "asset_id": "a1"}

    def sub(m):
        name = m.group(1).split(":")[0]
        return urllib.parse.quote(values.get(name, "x"), safe="/:")

    return re.sub(r"\{([^}]+)\}", sub, template)


def _body(method: str, path: str) -> tuple[bytes | None, dict]:
    if method not in ("POST", "PUT", "PATCH"):
        return None, {}
    if path.rstrip("/").endswith("/upload"):
        boundary = "studio-probe"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"probe.jsonl\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n{{\"instruction\": \"x\", \"output\": \"y\"}}\n\r\n"
                f"--{boundary}--\r\n").encode()
        return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if path.rstrip("/").endswith("/login"):
        return b"username=ana&password=wrong-password", {"Content-Type": "application/x-www-form-urlencoded"}
    # What /start, a queue join or a cancel would act on, were it let in.
    payload = {"data": ["probe-run", {"output.adapter_dir": "/tmp/studio-probe-victim"}], "fn_index": 0,
               "trigger_id": 0, "session_hash": "abc123", "event_id": "e1", "bucket_id": "someone/bucket"}
    return json.dumps(payload).encode(), {"Content-Type": "application/json"}


FORBIDDEN_IN_PUBLIC = [b"parameter_name", b"\"/push\"", b"/preview", b"finance_alpaca", b"secret-run-name", b"Hub token", b"export-token", b"dependencies\":[{",
                       CANARY.encode(), PASSWORD.encode(), b"tiny-demo"]


def test_every_route_answers_only_with_the_login(app_with_password):
    s = app_with_password
    port, home = s["port"], s["home"]
    routes = _routes(s["demo"].server_app)
    assert len(routes) > 40 and ("POST", "/gradio_api/queue/join") in routes  # the real table, not a stub
    assert not [r for r in routes if "run-history" in r[1] or "/mcp" in r[1]]  # not even registered
    probes = [(m, _fill(t, s["run_file"])) for m, t in routes] + GRADIO_ROUTES_OFF
    probes += [(m, v) for v in VARIANTS for m in ("GET", "POST")]
    probes += [(m, p) for p in ("/", "/config", "/gradio_api/queue/join", "/gradio_api/upload", "/login")
               for m in ("OPTIONS", "PUT", "DELETE", "PATCH", "TRACE")]
    before = _tree(home)
    leaks, acted = [], []
    for method, path in probes:
        body, headers = _body(method, path)
        status, rh, data = _request(port, method, path, body, headers)
        kind = classify(method, urllib.parse.unquote(path.split("?")[0]))
        gated = rh.get(GATE_HEADER) == "refused"
        if kind == "public":
            # The login page and static files: nothing about the studio, its runs or its API.
            if any(f in data for f in FORBIDDEN_IN_PUBLIC) or status >= 500:
                leaks.append((method, path, status, data[:120]))
        elif not (gated and status in (401, 403, 404)):
            acted.append((method, path, status, data[:120]))
    assert not acted, f"answered without a login: {acted}"
    assert not leaks, f"public routes gave away: {leaks}"
    after = _tree(home)
    assert after == before, sorted(set(after) ^ set(before))  # no upload kept, no run created, nothing written
    assert not Path("/tmp/studio-probe-victim").exists()
    assert len(probes) > 180


def test_with_the_login_the_studio_works_and_turned_off_routes_stay_off(app_with_password):
    s = app_with_password
    port, cookie = s["port"], {"Cookie": s["cookie"]}
    status, _, body = _request(port, "GET", "/config", headers=cookie)
    assert status == 200 and b"export-token" in body
    assert json.loads(body).get("run_history") is False  # the browser records no call, no token
    status, _, info = _request(port, "GET", "/gradio_api/info", headers=cookie)
    assert status == 200 and b"/start" in info and b"/push" in info
    assert CANARY.encode() not in body + info and PASSWORD.encode() not in body + info  # the server's secrets
    # Workers are started with the app's environment: the password is no longer in it once the app serves.
    assert PASSWORD not in os.environ.values()
    status, _, body = _request(port, "GET", f"/gradio_api/file={s['run_file']}", headers=cookie)
    assert status == 200 and body == s["run_file"].read_bytes()
    for method, path in GRADIO_ROUTES_OFF:
        status, rh, _ = _request(port, method, path, *_body(method, path)[:1], headers=cookie)
        assert status == 404 and rh.get(GATE_HEADER) == "refused", (method, path, status)
    # A stale, forged or other app's cookie is no login.
    name = s["cookie"].split("=", 1)[0]
    for forged in (f"{name}=not-a-token", f"{name}=", "access-token-other=abc", f"{name.replace('-token-', '-token-unsecure-')}=x"):
        status, rh, _ = _request(port, "GET", "/config", headers={"Cookie": forged})
        assert status == 401 and rh.get(GATE_HEADER) == "refused", forged


def test_a_wrong_password_or_a_foreign_page_gets_nothing(app_with_password):
    s = app_with_password
    port = s["port"]
    for user, pw in (("ana", "wrong-password"), ("admin", PASSWORD), ("ana", ""), ("ana", PASSWORD.upper())):
        status, headers, _ = _request(port, "POST", "/login", urllib.parse.urlencode({"username": user, "password": pw})
                                      .encode(), {"Content-Type": "application/x-www-form-urlencoded"})
        assert status != 200 and "set-cookie" not in headers, (user, pw)
    cookie = {"Cookie": s["cookie"]}
    # A page on another site (or a DNS-rebinding name) driving a logged-in browser.
    for extra in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Host": "evil.example"},
                  {"Host": f"rebind.example:{port}"}):
        status, rh, _ = _request(port, "POST", "/gradio_api/queue/join", b"{}",
                                 {**cookie, "Content-Type": "application/json", **extra})
        assert status == 403 and rh.get(GATE_HEADER) == "refused", extra
    status, _, _ = _request(port, "GET", "/config", headers={**cookie, "Origin": f"http://127.0.0.1:{port}"})
    assert status == 200


def test_without_a_password_loopback_only_and_the_same_routes_off(tmp_path):
    import app

    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("STUDIO_PASSWORD", raising=False)
        mp.setenv("STUDIO_CONFINE_PATHS", "1")  # app.main sets it; the context restores it afterwards
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio_tmp"))
        demo = app.main(["--port", str(port)], block=False)
        with contextlib.closing(demo):
            assert _request(port, "GET", "/config")[0] == 200
            for method, path in GRADIO_ROUTES_OFF:
                status, rh, _ = _request(port, method, path, *_body(method, path)[:1])
                assert status == 404 and rh.get(GATE_HEADER) == "refused", (method, path)
            for extra in ({"Host": "evil.example"}, {"Origin": "http://evil.example"}):
                status, _, _ = _request(port, "POST", "/gradio_api/queue/join", b"{}",
                                        {"Content-Type": "application/json", **extra})
                assert status == 403, extra


def test_a_password_cannot_be_guessed_at_speed(app_with_password):
    """Last in this module: it locks this client out of logging in for a minute."""
    from studio.ui.gate import LOGIN_TRIES

    port, form = app_with_password["port"], {"Content-Type": "application/x-www-form-urlencoded"}
    statuses = [_request(port, "POST", "/login", f"username=ana&password=guess-{i}".encode(), form)[0]
                for i in range(LOGIN_TRIES + 2)]
    assert 429 in statuses and all(s != 200 for s in statuses), statuses
    status, headers, _ = _request(port, "POST", "/login", f"username=ana&password={PASSWORD}".encode(), form)
    assert status == 429 and "set-cookie" not in headers  # even the right password waits out the window
    assert _request(port, "GET", "/config", headers={"Cookie": app_with_password["cookie"]})[0] == 200
