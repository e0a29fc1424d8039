"""The Dockerfile's steps, run outside a container, serve the demo (issue 14).

No image can be built here: a container engine installs (Debian's podman runs with runc) but no base image can
be pulled (only PyPI, Debian and npm are reachable).  So this test reads the Dockerfile and does what a build
and ``docker run`` would: the build context is the files git would commit (``.dockerignore`` keeps the rest out),
``ENV``/``WORKDIR``/``USER`` apply as in the image, every ``RUN`` after ``USER`` runs verbatim with ``sh -c`` as
uid 1000 (when the test runs as root), the ``RUN`` before it (creating the user and ``/data``) is checked and
done as it would be, and ``CMD`` is started with ``STUDIO_PASSWORD`` set, as ``docker run -e`` would.

What stands in for the image: absolute paths (``/home/user``, ``/data``) live under a fresh folder; ``python``
is the test's interpreter (3.11, as ``python:3.11-slim``); and the registry is the test environment: the image's
venv is created first with a ``.pth`` onto the test environment's site-packages and pip runs with
``--no-index`` (``PIP_NO_INDEX``), so ``pip install -r requirements.txt .`` finds every pin installed and only
builds and installs the studio, without a download.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from e2e_helpers import free_port, page_behind_password, serve_command
from install_helpers import ROOT, checkout_copy, fresh_venv

UID = 1000
PASSWORD = "docker-test-password"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)
            if not m[0].lstrip().startswith("#")]


def env_pairs(arg: str, env: dict) -> dict:
    out = {}
    for word in shlex.split(arg):
        k, v = word.split("=", 1)
        out[k] = re.sub(r"\$\{?(\w+)\}?", lambda m: {**env, **out}.get(m[1], ""), v)
    return out


def test_the_dockerfile_installs_the_package_as_uid_1000_with_data_on_a_volume():
    steps = instructions()
    kinds = [k for k, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert ("USER", str(UID)) in steps and kinds.index("USER") < kinds.index("COPY")
    (setup,) = [a for k, a in steps[:kinds.index("USER")] if k == "RUN"]
    assert f"useradd --create-home --uid {UID} user" in setup and "chown user:user /data" in setup
    install = " ".join(a for k, a in steps if k == "RUN")
    assert "pip install --no-cache-dir -r requirements.txt ." in install
    assert ("VOLUME", '["/data"]') in steps and ("EXPOSE", "7860") in steps
    assert json.loads(dict(steps)["CMD"]) == ["qlora-studio"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "models", "studio_home", ".git"} <= set(ignored)


def test_the_dockerfiles_steps_build_and_serve_the_demo(tmp_path):
    # A folder every uid can reach (pytest's own tmp is private to its user) standing for the image's "/".
    root = Path(tempfile.mkdtemp(prefix="image-root-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        _build_and_serve(root, tmp_path)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _build_and_serve(root: Path, tmp_path: Path) -> None:
    # As uid 1000 where the test can be (root) and that uid can run this Python (not so where the interpreter
    # lives in a private home, as pyenv's under /root); otherwise as the caller.
    as_user = os.geteuid() == 0 and _runs_as(UID, [sys.executable, "-c", ""])

    def rooted(s: str) -> str:
        return re.sub(r"(?<![\w./-])/(home|data)\b", lambda m: f"{root}/{m[1]}", s)

    def own(path: Path) -> None:
        if as_user:
            for p in [path, *path.rglob("*")]:
                os.lchown(p, UID, UID)

    ids = dict(user=UID, group=UID, extra_groups=[]) if as_user else {}
    env = {"PATH": os.environ["PATH"], "HOME": rooted("/home/user"), "LANG": "C.UTF-8"}
    # While building, the test environment is the registry (module docstring), and its setuptools is the build
    # backend pip's build isolation would fetch: alone on PYTHONPATH, ahead of the older one ensurepip puts in
    # the venv (the whole environment there would also hide pip from ensurepip, and pip would not be in the venv).
    registry = {"PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                "PIP_REQUIRE_VIRTUALENV": "1",  # never the machine's own Python, whatever PATH finds
                "PYTHONPATH": str(_only_setuptools(root / "build-backend"))}
    # The base image's `python` (3.11, as python:3.11-slim): this interpreter, alone on a folder of its own.
    base_bin = root / "usr" / "local" / "bin"
    base_bin.mkdir(parents=True)
    (base_bin / "python").symlink_to(sys.executable)
    env["PATH"] = f"{base_bin}{os.pathsep}{env['PATH']}"
    workdir, user, steps = root, None, instructions()
    for kind, arg in steps[1:]:
        if kind == "RUN" and user is None:
            # The image's system setup: the user's home and /data, owned by uid 1000.
            for d in ("/home/user", "/data"):
                Path(rooted(d)).mkdir(parents=True, exist_ok=True)
                own(Path(rooted(d)))
        elif kind == "USER":
            user = int(arg)
        elif kind == "WORKDIR":
            workdir = Path(rooted(arg))
            workdir.mkdir(parents=True, exist_ok=True)
            own(workdir)
        elif kind == "ENV":
            env.update({k: rooted(v) for k, v in env_pairs(arg, env).items()})
        elif kind == "COPY":
            assert arg == "--chown=user:user . .", arg
            checkout_copy(workdir)
            own(workdir)
        elif kind == "RUN":
            command = rooted(arg)
            venv = re.search(r"python -m venv (\S+)", command)
            if venv:  # the image's venv, seeing the test environment's packages (module docstring)
                # With pip of its own: once the .pth is there, ensurepip would find the test environment's newer
                # pip and install none, and the Dockerfile's `pip` would not be the venv's.
                fresh_venv(Path(venv[1]), with_pip=True)
                own(Path(venv[1]))
            out = subprocess.run(["sh", "-c", command], cwd=workdir, env={**env, **registry}, capture_output=True,
                                 text=True, timeout=900, **ids)
            assert out.returncode == 0, f"RUN {arg}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        elif kind == "CMD":
            cmd = json.loads(arg)
    assert user == UID

    home, data = Path(rooted("/home/user")), Path(rooted("/data"))
    assert (home / "models" / "tiny-mistral" / "model.safetensors").is_file(), "the demo model is in the image"
    port = free_port()
    run_env = dict(env, PORT=str(port), STUDIO_PASSWORD=PASSWORD)  # docker run -p PORT -e STUDIO_PASSWORD
    exe = shutil.which(cmd[0], path=env["PATH"])
    assert exe and Path(exe).is_relative_to(home), f"{cmd[0]} is not the image's: {exe}"
    with serve_command([exe, *cmd[1:]], port, run_env, workdir, tmp_path / "serve.log", name="the image's CMD",
                       **ids) as url:
        assert '"title":"QLoRA Studio"' in page_behind_password(url, "admin", PASSWORD)
    assert (data / "qlora-studio" / "runs").is_dir(), "runs live on the volume"
    if as_user:
        assert all(p.stat().st_uid == UID for p in data.rglob("*")), "the studio runs as uid 1000"


def _runs_as(uid: int, cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, user=uid, group=uid, extra_groups=[], capture_output=True).returncode == 0
    except PermissionError:
        return False


def _only_setuptools(dest: Path) -> Path:
    """A folder holding (as links) only the test environment's setuptools: its packages and its metadata."""
    dist = importlib.metadata.distribution("setuptools")
    dest.mkdir()
    for top in {Path(f).parts[0] for f in dist.files if not str(f).endswith(".pth")} - {".."}:
        src = Path(dist.locate_file(top))
        if src.exists():
            (dest / top).symlink_to(src)
    return dest
