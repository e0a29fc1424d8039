"""Helpers for the browser test: serve ``app.py`` in its own process group, find Debian's Chromium, take
screenshots.

Contract: ``serve_app(home)`` is a context manager yielding the studio's URL once its port answers; on exit
it ends the app's process group and the process group of every training worker the app started under
``home`` (a failed test must not leave a worker training on a shared machine); ``serve_command`` does the
same for any command serving on a given port (the installed ``qlora-studio``, a notebook's kernel).
``chromium_path()`` returns the browser to launch or fails the test with the command that installs it (CI
runs ``make browser``).
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest
from playwright.sync_api import expect

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1366, "height": 900}  # a laptop screen
START_TIMEOUT_S = 120.0


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("Chromium is not installed: the browser test drives Debian's chromium. Install it with "
                "`make browser` (apt-get install chromium); do not run `playwright install`.", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _end_group(pid: int) -> None:
    """SIGTERM the process group led by ``pid``, SIGKILL it if it is still there after a few seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        for _ in range(50):
            try:
                os.killpg(pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)


def _end_workers(home: Path) -> None:
    # Workers run in their own process groups (studio.worker), so ending the app does not end them.  Only pids
    # that are this home's workers: a pid file may be stale, planted, or name the test itself.
    from studio.runs import RunStore

    for run in RunStore(home / "runs").list():
        pid = run.worker_pid()
        if pid is not None and run.worker_alive():
            _end_group(pid)


@contextlib.contextmanager
def serve_app(home: Path, log_path: Path):
    """Run ``python app.py --port N`` with ``STUDIO_HOME=home``; yield its URL once the port answers."""
    port = free_port()
    env = dict(os.environ, STUDIO_HOME=str(home), PYTHONUNBUFFERED="1")
    try:
        with serve_command([sys.executable, "app.py", "--port", str(port)], port, env, ROOT, log_path,
                           name="app.py") as url:
            yield url
    finally:
        _end_workers(home)


@contextlib.contextmanager
def serve_command(cmd: list[str], port: int, env: dict, cwd: Path, log_path: Path, *,
                  timeout: float = START_TIMEOUT_S, name: str = "", **popen):
    """Start ``cmd`` in its own process group (``popen``: more ``Popen`` arguments, e.g. ``user``); yield
    ``http://127.0.0.1:port/`` once the port answers; end the group on exit, and every process the command
    started, in that group or not."""
    name = name or Path(cmd[0]).name
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, **popen)
    try:
        deadline = time.monotonic() + timeout
        while not answers(port):
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode} before serving:\n{tail(log_path)}",
                            pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"{name} did not answer on port {port} within {timeout:.0f} s:\n"
                            f"{tail(log_path)}", pytrace=False)
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/"
    finally:
        # A notebook kernel starts in a session of its own, so its children are ended by pid as well.
        descendants = []
        with contextlib.suppress(psutil.Error):
            descendants = psutil.Process(proc.pid).children(recursive=True)
        _end_group(proc.pid)
        proc.wait(timeout=10)
        for p in descendants:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        for p in psutil.wait_procs(descendants, timeout=5)[1]:
            with contextlib.suppress(psutil.Error):
                p.kill()


def page_behind_password(url: str, user: str, password: str) -> str:
    """The studio's page at ``url``, which must refuse its config without a login and give it with one."""
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url + "config", timeout=60)
    assert refused.value.code == 401, "served without asking for the password"
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    form = urllib.parse.urlencode({"username": user, "password": password}).encode()
    with browser.open(url + "login", data=form, timeout=60) as r:
        assert r.status == 200
    with browser.open(url, timeout=60) as r:
        assert r.status == 200
        return r.read().decode()


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def screenshot(page, name: str) -> Path:
    """A full-page PNG under artifacts/screenshots/ (the viewport is 1366 wide, as on a laptop)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


# ---- acting in the page ----------------------------------------------------------------------------

# Gradio shows a status tracker on an output while its event is pending or streaming and hides it after.
# An observer armed before the action records "shown, then hidden", so a chained event (upload, then
# schema, then preview) cannot be mistaken for done in the gap before it starts.
ARM = """id => {
  window.__settled = window.__settled || {};
  const el = document.getElementById(id);
  const state = window.__settled[id] = {busy: false, done: false};
  const check = () => {
    const t = el.querySelector("[data-testid='status-tracker']");
    const busy = !!t && !t.classList.contains("hide");
    if (busy) state.busy = true; else if (state.busy) state.done = true;
  };
  new MutationObserver(check).observe(el, {attributes: true, subtree: true, childList: true});
}"""
# Warnings and errors reach the user as toasts; record every one shown, however briefly.
TOAST_WATCH = """() => {
  window.__toasts = [];
  new MutationObserver(() => document.querySelectorAll(".toast-body.warning, .toast-body.error").forEach(t => {
    if (!t.dataset.seen) { t.dataset.seen = "1"; window.__toasts.push(t.innerText); }
  })).observe(document.documentElement, {childList: true, subtree: true});
}"""


def open_tab(page, label: str) -> None:
    tab = page.get_by_role("tab", name=label)
    tab.click()
    expect(tab).to_have_attribute("aria-selected", "true")


def arm(page, elem_id: str) -> None:
    page.evaluate(ARM, elem_id)


def settled(page, elem_id: str, timeout: float = 60_000) -> None:
    """Wait until the event armed on ``elem_id`` has shown its spinner and finished."""
    page.wait_for_function("id => window.__settled[id].done", arg=elem_id, timeout=timeout)
