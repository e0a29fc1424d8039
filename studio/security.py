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
- Paths a user names (``output.adapter_dir``, data files, local models) resolve inside the folders the
  studio owns (the studio home; for reading also the repo's ``samples/``, ``presets/`` and ``models/``)
  or inside a folder the operator allowed in ``STUDIO_ALLOWED_PATHS`` (``app.py --allow-path``), through
  ``output_dir`` and ``readable_path``; refusals are ``PathRefused`` errors that name the field.
- ``replace_output(src, dest, field)`` is the only way the studio writes a folder a user named: it
  creates it with a marker file (``MARKER``) and replaces an existing folder only when it carries that
  marker, so nothing the studio did not create is ever deleted or overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path


class SecurityError(ValueError):
    """A name or path was refused."""


class PathRefused(SecurityError):
    """A path a user named was refused; ``key`` is the field (``output.adapter_dir``), as ConfigError has."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


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


# ---- paths a user names ---------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent
ALLOW_ENV = "STUDIO_ALLOWED_PATHS"
OUTPUTS = "outputs"  # relative output folders land here, under the studio home
MARKER = ".qlora-studio-output"  # written into every folder the studio creates for a user-named path


def studio_home() -> Path:
    # The same rule as studio.runs.studio_home (kept here so this module imports nothing of ours).
    return Path(os.environ.get("STUDIO_HOME", REPO_ROOT / "studio_home"))


def allowed_roots() -> list[Path]:
    """Folders the operator allowed beyond the studio home (``STUDIO_ALLOWED_PATHS``, ``os.pathsep``-separated)."""
    roots = []
    for part in os.environ.get(ALLOW_ENV, "").split(os.pathsep):
        part = part.strip()
        if part:
            p = Path(part).expanduser()
            if p.is_absolute() and p.resolve() != Path(p.anchor):  # never the whole filesystem
                roots.append(p.resolve())
    return roots


def _under(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def _where(roots: list[Path]) -> str:
    return ", ".join(str(r) for r in roots)


def read_roots(kind: str) -> list[Path]:
    """Folders a user-named file of ``kind`` (data, model, preset) may be read from."""
    shipped = {"data": [REPO_ROOT / "samples"], "model": [REPO_ROOT / "models"], "preset": [REPO_ROOT / "presets"]}
    extra = []
    if kind == "model" and os.environ.get("STUDIO_TINY_MODEL_DIR"):
        extra.append(Path(os.environ["STUDIO_TINY_MODEL_DIR"]))  # the offline demo model the operator built
    return [r.resolve() for r in (studio_home(), *shipped.get(kind, []), *extra)] + allowed_roots()


def readable_path(value: str, key: str, kind: str, base: Path | None = None) -> Path:
    """Resolve a file or folder a user named for reading; relative values resolve against ``base`` (default: the
    repository).  Raises ``PathRefused`` naming ``key`` unless it lies inside ``read_roots(kind)``."""
    raw = str(value)
    if "\x00" in raw:
        raise PathRefused(key, "contains a NUL character.")
    p = Path(raw).expanduser()
    p = (p if p.is_absolute() else (base or REPO_ROOT) / p).resolve()
    roots = read_roots(kind)
    if not any(_under(p, r) for r in roots):
        raise PathRefused(key, f"{raw!r} is outside the folders the studio may read ({_where(roots)}); put it there "
                          f"or ask the operator to allow its folder ({ALLOW_ENV} or app.py --allow-path).")
    return p


CONFINE_ENV = "STUDIO_CONFINE_PATHS"  # "1" in the served app and its workers (app.py sets it)


def confined() -> bool:
    """Whether model folders named by a user are held to ``read_roots("model")``: always in the served app and the
    workers it starts; the command line (the operator at their own shell) reads where it is told."""
    return os.environ.get(CONFINE_ENV) == "1"


def local_model(value: str, key: str = "model.base_model") -> Path | None:
    """A base model named as a local folder (the rule ``modeling.resolve_base`` loads by: it exists, or it starts with
    ``/``, ``.`` or ``~``), checked like any readable path; ``None`` for a Hub id."""
    v = str(value).strip()
    if not v or not (v.startswith(("/", ".", "~")) or Path(v).expanduser().exists()):
        return None
    return readable_path(v, key, "model", base=Path.cwd())


def local_dataset(value: str, key: str = "data.hub_dataset") -> Path | None:
    """A "hub dataset" that ``datasets.load_dataset`` would read from a local folder or file (it exists, or it starts
    with ``/``, ``.`` or ``~``): in the served app it must lie where a data file may (``read_roots("data")``)."""
    v = str(value).strip()
    if not v or not (v.startswith(("/", ".", "~")) or Path(v).expanduser().exists()):
        return None
    return readable_path(v, key, "data", base=Path.cwd()) if confined() else None


def output_dir(value: str, key: str = "output.adapter_dir") -> Path:
    """Where a user-named output folder goes.  A relative value lands under ``<studio home>/outputs/``; an absolute
    one must lie inside the studio home or an allowed folder (not be one of them), and never inside the studio's
    own runs, uploads, presets or temporary files.  Raises ``PathRefused`` naming ``key``."""
    raw = str(value).strip()
    if not raw:
        raise PathRefused(key, "is empty.")
    if "\x00" in raw:
        raise PathRefused(key, "contains a NUL character.")
    home = studio_home().resolve()
    p = Path(raw).expanduser()
    if not p.is_absolute():
        if raw.startswith("~"):
            raise PathRefused(key, f"{raw!r}: name a folder relative to the studio's outputs or an absolute one.")
        p = home / OUTPUTS / p
    p = p.resolve()
    outputs = (home / OUTPUTS).resolve()
    roots = [home, *allowed_roots()]
    if not any(root in p.parents for root in roots):
        raise PathRefused(key, f"{raw!r} is outside the folders the studio may write ({_where(roots)}); use a "
                          f"relative name (it goes under {outputs}) or ask the operator to allow a folder "
                          f"({ALLOW_ENV} or app.py --allow-path).")
    if _under(p, home) and not _under(p, outputs):  # runs, uploads, presets, temp files: never, allowed or not
        raise PathRefused(key, f"{raw!r} is inside the studio's own folders; use a relative name (it goes under "
                          f"{outputs}).")
    if any(_under(r, p) for r in (home, outputs)):
        raise PathRefused(key, f"{raw!r} would replace the studio's own folders; use a folder under {outputs}.")
    return p


def owned(folder: Path) -> bool:
    """Whether the studio created ``folder`` (it carries the studio's marker file)."""
    return folder.is_dir() and not folder.is_symlink() and (folder / MARKER).is_file()


def check_output_free(dest: Path, key: str = "output.adapter_dir") -> None:
    """Refuse a destination that exists and was not created by the studio (checked before a run and at save)."""
    if dest.is_symlink() or (dest.exists() and not owned(dest)):
        raise PathRefused(key, f"{str(dest)!r} already exists and was not created by the studio; it is never deleted "
                          "or overwritten. Choose a new folder name, or move that folder away yourself.")


def replace_output(src: Path, dest: Path, key: str = "output.adapter_dir", note: dict | None = None) -> Path:
    """Copy the folder ``src`` to ``dest`` (already checked by ``output_dir``).  ``dest`` is created with the
    studio's marker; an existing ``dest`` is replaced only when it carries the marker.  The new copy is written
    beside it first and renamed into place, so ``dest`` is never half-written."""
    check_output_free(dest, key)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, symlinks=True)
    (tmp / MARKER).write_text(json.dumps({"created_by": "qlora-studio", **(note or {})}) + "\n", encoding="utf-8")
    if dest.exists():
        check_output_free(dest, key)  # again, just before deleting: it must still be ours
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)
    return dest
