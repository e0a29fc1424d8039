"""The studio's draft: what the user chose (preset, its edits, the data and its mapping), kept on the server.

Contract:
- One draft per studio home, in ``<studio_home>/draft.json``: the preset's label (a preset name, or the YAML
  file it came from), the preset's whole config as a base (so a loaded YAML, which is not in the preset list,
  comes back too) and the values of the widgets that differ from it, by dotted key (``{"data.max_length":
  48}``).  Values are kept as the widgets hold them, even half-typed or out of range, so a reload shows
  exactly what was on screen; ``config`` validates them into a ``RunConfig`` (errors name the key).
- ``save`` writes atomically (a temp file, then a rename), so a reader never sees half a draft; ``load``
  returns ``None`` for a missing, torn or foreign file rather than raising.
- No secret goes in: the config has no token field, and every string value passes through ``redact``.
- Every browser reads the same file, so a second browser (or the same one after a reload) starts where the
  last edit left off.  ``stamp`` names the version on disk, so an open page can follow edits made in another
  browser; ``save_if_changed`` writes only a draft that differs from the file's; ``merge`` puts one page's
  edits on top of a draft another browser saved since that page last took one on.  Imports nothing of the UI.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from studio.config import RunConfig
from studio.paths import studio_home
from studio.security import redact

VERSION = 1
MAX_BYTES = 4 * 2**20  # a draft is a few KB; anything this large is not ours


@dataclass
class Draft:
    preset: str  # the preset list's value, or a label such as "my.yaml (loaded file)"
    base: dict  # the preset's RunConfig.to_dict()
    values: dict = field(default_factory=dict)  # dotted key -> widget value, only where it differs from base
    by: str = ""  # which open page saved it (a random id per page), so a page never takes on its own saves

    def value(self, key: str, default):
        return self.values.get(key, default)

    def config(self) -> RunConfig:
        """The config a run would train on: the base with the values applied, validated."""
        return RunConfig.from_dict(self.base).replace(self.values)


def path() -> Path:
    return studio_home() / "draft.json"


def _clean(v):
    if isinstance(v, str):
        return redact(v)
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if v is None or isinstance(v, (bool, int, float)):
        return v
    return redact(str(v))


def save(draft: Draft) -> Path:
    p = path()
    p.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"version": VERSION, "preset": _clean(draft.preset), "base": _clean(draft.base),
                       "values": _clean(draft.values), "by": _clean(draft.by)}, ensure_ascii=False, indent=1)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".draft-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def load() -> Draft | None:
    p = path()
    try:
        if not p.is_file() or p.stat().st_size > MAX_BYTES:
            return None
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("version") != VERSION or not isinstance(d.get("base"), dict) \
            or not isinstance(d.get("values"), dict):
        return None
    return Draft(str(d.get("preset") or ""), d["base"], d["values"], str(d.get("by") or ""))


def stamp() -> str:
    """Which version of the draft is on disk ("" when none): every save replaces the file, so its inode and
    modification time change.  Open pages compare it with the version they show to follow other browsers."""
    try:
        st = path().stat()
    except OSError:
        return ""
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def _body(draft: Draft) -> str:
    return json.dumps({"preset": _clean(draft.preset), "base": _clean(draft.base), "values": _clean(draft.values)},
                      sort_keys=True)


def save_if_changed(draft: Draft) -> bool:
    """Save ``draft`` unless the file already holds the same choices (whoever saved them); -> whether it wrote.
    A page that takes on another browser's draft sends its widgets' change events back: those must not write
    again, or two open pages would hand the draft back and forth for ever."""
    old = load()
    if old is not None and _body(old) == _body(draft):
        return False
    save(draft)
    return True


def as_dict(draft: Draft) -> dict:
    """The draft as saved (strings redacted, JSON types): what a page keeps of the version it shows."""
    return json.loads(_body(draft))


def from_dict(d: dict) -> Draft:
    return Draft(str(d.get("preset") or ""), dict(d.get("base") or {}), dict(d.get("values") or {}))


def _same_json(a, b) -> bool:
    return json.dumps(_clean(a), sort_keys=True) == json.dumps(_clean(b), sort_keys=True)


def merge(theirs: Draft, before: Draft, mine: Draft) -> Draft:
    """``mine``'s edits since ``before`` (the version its page last took on) applied on top of ``theirs`` (a
    newer draft another browser saved meanwhile): two people editing different fields both keep their edit.
    Another preset chosen, loaded or saved replaces the whole draft, as it does on one page."""
    # The base, not only the label: "Save preset" names the preset first and changes the base after, so two
    # saves in a row may carry one label and two bases, and the values are measured from the new one.
    if mine.preset != before.preset or not _same_json(mine.base, before.base):
        return mine
    missing = object()
    values = dict(theirs.values)
    for k in {*before.values, *mine.values}:
        was, now = before.values.get(k, missing), mine.values.get(k, missing)
        if was is missing or now is missing or not _same_json(was, now):
            if now is missing:
                values.pop(k, None)  # set back to the preset's value on this page
            else:
                values[k] = now
    return Draft(theirs.preset, theirs.base, values)


def clear() -> None:
    path().unlink(missing_ok=True)
