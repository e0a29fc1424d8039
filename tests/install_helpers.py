"""Helpers for the tests that install the studio as a user does: a copy of the checkout, a wheel built from it,
and a fresh virtualenv.

Contract: ``checkout_copy(dest)`` copies the files git would commit (tracked and untracked-but-not-ignored, so
no ``.venv``, built models or studio home) and returns ``dest``; building from a copy keeps pip's ``build/`` and
``*.egg-info`` out of the checkout.  ``build_wheel(src, out)`` builds ``qlora-studio``'s wheel offline with the
test environment's setuptools (pinned in requirements-dev.txt) and returns its path.  ``fresh_venv(dest)``
creates an empty virtualenv that also sees this interpreter's site-packages through a ``.pth`` file and returns
its bin folder (``with_pip``: with a pip of its own).

Why a ``.pth`` rather than ``--system-site-packages``: the test interpreter is itself a virtualenv (``.venv``), and
``--system-site-packages`` would expose the *base* Python's packages, not the venv's torch, transformers and
gradio.  A ``.pth`` line is appended to ``sys.path`` after the new venv's own site-packages, so whatever is
installed into the new venv (the wheel) wins, while the 2 GB of heavy dependencies are reused instead of
downloaded (``pip install --no-deps --no-index`` then proves nothing is fetched).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def checkout_copy(dest: Path) -> Path:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True)
    for rel in filter(None, out.stdout.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the working tree is not part of it
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def build_wheel(src: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(out), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("qlora_studio-*.whl")
    return wheel


def site_packages() -> list[str]:
    """This interpreter's site-packages folders (one, or more where its venv reaches another through a .pth)."""
    return [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]


def fresh_venv(dest: Path, with_pip: bool = False) -> Path:
    """``with_pip``: a pip of the venv's own (ensurepip), as ``python -m venv`` makes; without it the venv runs
    the test environment's pip, and is made in a fraction of the time."""
    subprocess.run([sys.executable, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(dest)], check=True)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(dest), "platbase": str(dest)}))
    (purelib / "_test_env.pth").write_text("\n".join(site_packages()) + "\n")
    return dest / "bin"


def pip_install(bin_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """``pip install`` into the venv of ``bin_dir`` (pip itself comes from the test environment)."""
    return subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-index", *args],
                          check=True, capture_output=True, text=True)
