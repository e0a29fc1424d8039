"""Where the studio's files are: what it ships, and what it writes.  Imports nothing of ours.

Two ways to run, one set of answers:

- **From a clone** (``python app.py``, ``python -m studio``, ``make demo``): the shipped files are the
  repo's own ``app.py``, ``presets/`` and ``samples/``; the studio home defaults to ``<repo>/studio_home``
  and the built tiny model to ``<repo>/models/tiny-mistral``, as they always have.
- **Installed** (``pip install .``, the ``qlora-studio`` command): the wheel carries the same three as
  ``studio/shipped/`` (``pyproject.toml`` maps the repo root there), read-only; everything the studio
  writes goes under the studio home, by default ``~/.qlora-studio``, never into site-packages or the
  current directory.

``STUDIO_HOME`` moves the studio home and ``STUDIO_TINY_MODEL_DIR`` the tiny model, in both cases.  Every
function reads the environment when called, so a test (or a user) can move them between calls.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# Present only in an installed wheel: the repo root's app.py, presets/ and samples/, mapped by pyproject.toml.
_WHEEL_SHIPPED = PACKAGE_DIR / "shipped"


def installed() -> bool:
    """True when running from an installed wheel rather than a clone (or an editable install of one)."""
    return _WHEEL_SHIPPED.is_dir()


def shipped_root() -> Path:
    """The read-only folder holding ``app.py``, ``presets/`` and ``samples/``: the repo root in a clone."""
    return _WHEEL_SHIPPED if installed() else PACKAGE_DIR.parent


def presets_dir() -> Path:
    """The shipped presets (the user's own are in ``user_presets_dir``)."""
    return shipped_root() / "presets"


def samples_dir() -> Path:
    """The shipped sample datasets, which are also the sources the tiny model is built from."""
    return shipped_root() / "samples"


def app_file() -> Path:
    """``app.py``, the browser studio's launcher."""
    return shipped_root() / "app.py"


def shipped_file(value: str | Path) -> Path:
    """A path as a preset writes it (``samples/finance_alpaca.jsonl``): absolute ones as they are, relative
    ones from the current directory when such a file is there, else from the shipped root."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    here = p.resolve()
    return here if here.exists() else (shipped_root() / p).resolve()


def studio_home() -> Path:
    """Everything the studio writes: runs, uploads, user presets, preferences, Gradio's temp files."""
    env = os.environ.get("STUDIO_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".qlora-studio" if installed() else PACKAGE_DIR.parent / "studio_home"


def runs_root() -> Path:
    return studio_home() / "runs"


def uploads_dir() -> Path:
    return studio_home() / "uploads"


def user_presets_dir() -> Path:
    return studio_home() / "presets"


def tiny_model_dir() -> Path:
    """The built offline demo model: ``<repo>/models/tiny-mistral`` in a clone, under the studio home when
    installed (the wheel holds only its sources)."""
    env = os.environ.get("STUDIO_TINY_MODEL_DIR")
    if env:
        return Path(env).expanduser()
    base = studio_home() if installed() else PACKAGE_DIR.parent
    return base / "models" / "tiny-mistral"
