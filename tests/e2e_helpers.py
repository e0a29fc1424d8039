"""Helpers for the browser test: serve ``app.py`` in its own process group, find Debian's Chromium, take
screenshots.

Contract: ``serve_app(home)`` is a context manager yielding the studio's URL once its port answers; on exit
it ends the app's process group and the process group of every training worker the app started under
``home`` (a failed test must not leave a worker training on a shared machine).  ``chromium_path()`` returns
the browser to launch or fails the test with the command that installs it (CI runs ``make browser``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers(port):
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode} before serving:\n{tail(log_path)}",
                            pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer on port {port} within {START_TIMEOUT_S:.0f} s:\n"
                            f"{tail(log_path)}", pytrace=False)
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/"
    finally:
        _end_group(proc.pid)
        proc.wait(timeout=10)
        _end_workers(home)


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
