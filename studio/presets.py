"""Presets: YAML files validated into ``RunConfig``.

Contract: ``load_preset`` reads a YAML file with ``yaml.safe_load`` and returns a validated config or
raises ``ConfigError`` naming the file and the key (or the YAML line); ``list_presets`` lists the
shipped presets and the user's saved ones; ``save_preset`` writes a config under a checked name and
never overwrites a shipped preset.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from studio import paths
from studio.config import ConfigError, RunConfig
from studio.paths import user_presets_dir
from studio.security import SecurityError, check_name, inside

# The folder holding presets/ and samples/ (the repo root in a clone, studio/shipped/ when installed);
# relative data paths in presets are read from it.
REPO_ROOT = paths.shipped_root()
BUILTIN_DIR = paths.presets_dir()


def parse_yaml(text: str, source: str = "<text>") -> RunConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError("", f"{source}{where}: not valid YAML ({getattr(e, 'problem', e)}).") from None
    if data is None:
        raise ConfigError("", f"{source}: the file is empty.")
    try:
        return RunConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(e.key, f"{source}: {e}") from None
    except SecurityError as e:
        raise ConfigError("output.run_name", f"{source}: {e}") from None


def load_preset(name_or_path: str | Path) -> RunConfig:
    p = Path(name_or_path)
    if not p.suffix:
        p = find_preset(str(name_or_path))
    if not p.is_file():
        raise ConfigError("", f"preset {str(name_or_path)!r} not found; known: {', '.join(list_presets())}.")
    return parse_yaml(p.read_text(encoding="utf-8-sig"), str(p))


def find_preset(name: str) -> Path:
    for d in (BUILTIN_DIR, user_presets_dir()):
        p = d / f"{name}.yaml"
        if p.is_file():
            return p
    return BUILTIN_DIR / f"{name}.yaml"


def list_presets() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for d in (BUILTIN_DIR, user_presets_dir()):
        if d.is_dir():
            for p in sorted(d.glob("*.yaml")):
                out.setdefault(p.stem, p)
    return out


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)


def save_preset(cfg: RunConfig, name: str) -> Path:
    check_name(name, "preset name")
    if (BUILTIN_DIR / f"{name}.yaml").exists():
        raise ConfigError("name", f"{name!r} is a shipped preset; save under another name.")
    d = user_presets_dir()
    d.mkdir(parents=True, exist_ok=True)
    cfg.name = name
    path = inside(d, f"{name}.yaml")
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg), encoding="utf-8")
    tmp.replace(path)
    return path
