"""Every security rule of the studio, in one place.

Contract:
- ``check_name`` accepts only short names of letters, digits, ``._-`` (no leading dot): run names,
  preset names and output folders typed by a user pass through it.  No shell string is ever built
  from user input anywhere in the project; processes are started with argument lists.
- ``inside(root, *parts)`` resolves a path and raises ``SecurityError`` unless it stays under ``root``
  (symlinks resolved): run ids map to folders under the runs root only through it.
- ``inside_any(path, roots, base)`` does the same for files a browser names (samples and uploads).
- ``redact(text)`` removes Hub tokens (``hf_...``) and the current ``HF_TOKEN`` value from any text
  before it reaches a log, an events file, an error message or the UI.
- ``hub_token(user_value)`` returns the token to use (user input first, then ``HF_TOKEN``) without
  storing it anywhere.
- ``SAFE_LOAD`` holds the keyword arguments that every ``from_pretrained`` call passes so that only
  safetensors weights load and no remote code runs unless the user opted in.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


class SecurityError(ValueError):
    """A name or path was refused."""


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise SecurityError(
            f"{what}: {name!r} is not allowed; use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit.")
    return name


def inside(root: str | Path, *parts: str) -> Path:
    root_r = Path(root).resolve()
    target = root_r.joinpath(*parts).resolve()
    if target != root_r and root_r not in target.parents:
        raise SecurityError(f"path {'/'.join(parts)!r} is outside {root_r}.")
    return target


def inside_any(path: str | Path, roots: list[Path], base: Path) -> Path:
    """Resolve ``path`` (relative ones against ``base``) and refuse it unless it lies under one of ``roots``:
    the browser may name only files the studio ships or received as uploads."""
    p = Path(path).expanduser()
    p = (p if p.is_absolute() else base / p).resolve()
    if not any(root.resolve() in p.parents for root in roots):
        raise SecurityError(f"{Path(path).name}: the studio reads only its samples and uploaded files; "
                            "upload this file.")
    return p


def redact(text: str) -> str:
    if not text:
        return text
    text = _TOKEN.sub("hf_***", str(text))
    tok = os.environ.get("HF_TOKEN", "")
    if len(tok) >= 4:
        text = text.replace(tok, "***")
    return text


def hub_token(user_value: str | None = None) -> str | None:
    value = (user_value or "").strip() or os.environ.get("HF_TOKEN", "").strip()
    return value or None


def safe_load_kwargs(trust_remote_code: bool = False) -> dict:
    # use_safetensors=True makes transformers refuse pickle (.bin) checkpoints outright.
    return {"use_safetensors": True, "trust_remote_code": bool(trust_remote_code)}
