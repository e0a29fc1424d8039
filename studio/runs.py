"""Run directories: the single source of truth for every run, past or live.

Layout of ``<runs root>/<run id>/``::

    config.yaml        resolved RunConfig (no secrets)
    events.jsonl       append-only events: {"t", "type", ...}; types: status, metric, eval, sample,
                       checkpoint, log, error, data
    worker.pid         pid of the training worker while it may be alive
    STOP               present when a cooperative stop was requested
    checkpoints/       Trainer checkpoints (checkpoint-N/, each complete once trainer_state.json exists)
    adapter/           final adapter + tokenizer (loads with plain peft/transformers)
    logs/worker.log    the worker's stdout/stderr (tokens redacted at the source)

Contract: ``RunStore`` maps run ids to folders only through ``security.inside`` after
``check_name``; ``Run.status`` is derived from the last status event and whether the worker is alive,
so a killed app or worker shows as ``interrupted``.  Events are appended one JSON line at a time and
flushed, so readers tail them safely; a torn last line is ignored until complete.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from studio.paths import runs_root, shipped_file, studio_home  # noqa: F401  (studio_home: re-exported)
from studio.security import check_name, inside, redact

TERMINAL = ("completed", "failed", "stopped", "halted")
LIVE = ("queued", "starting", "running", "stopping")


def _clean(v):
    # JSON has no NaN/inf; keep them visible as strings rather than failing the write.
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, str):
        return redact(v)
    return v


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child counts as dead: it has exited, only its entry remains.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def status_of(events: list[dict], alive: bool) -> str:
    """A run's status from its events: a live status without a living worker means it was interrupted."""
    st = "created"
    for ev in events:
        if ev.get("type") == "status":
            st = ev["status"]
    return "interrupted" if st in LIVE and not alive else st


@dataclass
class Run:
    id: str
    dir: Path

    # ---- paths
    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def events_path(self) -> Path:
        return self.dir / "events.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.dir / "adapter"

    @property
    def log_path(self) -> Path:
        return self.dir / "logs" / "worker.log"

    @property
    def stop_flag(self) -> Path:
        return self.dir / "STOP"

    @property
    def pid_path(self) -> Path:
        return self.dir / "worker.pid"

    # ---- events
    def emit(self, type: str, **fields) -> dict:
        ev = _clean({"t": round(time.time(), 3), "type": type, **fields})
        if not is_main_process():
            return ev  # with several GPUs only rank 0 writes the run's history
        line = json.dumps(ev, ensure_ascii=False) + "\n"
        with open(self.events_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
        return ev

    def events(self, offset: int = 0) -> tuple[list[dict], int]:
        """Events from byte ``offset``; returns them and the offset to continue from."""
        if not self.events_path.exists():
            return [], offset
        with open(self.events_path, "rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a torn last line waits for its newline
        out = []
        for raw in data[:end].splitlines():
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
        return out, offset + end

    def all_events(self) -> list[dict]:
        return self.events(0)[0]

    # ---- state
    def worker_pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def worker_alive(self) -> bool:
        pid = self.worker_pid()
        return pid is not None and pid_alive(pid)

    def last_status(self) -> dict:
        last = {"status": "created"}
        for ev in self.all_events():
            if ev.get("type") == "status":
                last = ev
        return last

    @property
    def status(self) -> str:
        return status_of(self.all_events(), self.worker_alive())

    def config(self):
        from studio.presets import load_preset

        return load_preset(self.config_path)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a checkpoint is complete once trainer_state.json exists)."""
        if not self.checkpoints_dir.is_dir():
            return []
        cks = [p for p in self.checkpoints_dir.glob("checkpoint-*")
               if (p / "trainer_state.json").exists() and (p / "adapter_model.safetensors").exists()]
        return sorted(cks, key=lambda p: int(p.name.split("-")[-1]))

    def last_checkpoint(self) -> Path | None:
        cks = self.checkpoints()
        return cks[-1] if cks else None

    def summary(self) -> dict:
        evs = self.all_events()
        metrics = [e for e in evs if e.get("type") == "metric" and "loss" in e]
        evals = [e for e in evs if e.get("type") == "eval"]
        cfg_name = ""
        try:
            cfg_name = self.config().name
        except Exception:
            pass
        return {
            "id": self.id, "status": self.status, "preset": cfg_name,
            "started": evs[0]["t"] if evs else None,
            "step": max((e.get("step", 0) for e in evs if "step" in e), default=0),
            "train_loss": metrics[-1]["loss"] if metrics else None,
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "has_adapter": (self.adapter_dir / "adapter_model.safetensors").exists(),
        }


class RunStore:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else runs_root()
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, run_id: str) -> Run:
        check_name(run_id, "run id")
        path = inside(self.root, run_id)
        if not (path / "config.yaml").exists():
            raise KeyError(f"no run named {run_id!r}")
        return Run(run_id, path)

    def create(self, cfg, name: str = "") -> Run:
        base = check_name(name or cfg.output.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}", "run name")
        run_id, n = base, 1
        while (self.root / run_id).exists():
            n += 1
            run_id = f"{base}-{n}"
        path = inside(self.root, run_id)
        path.mkdir(parents=True)
        (path / "logs").mkdir()
        from studio.presets import to_yaml

        # Absolute data paths: the worker, evaluation and a restarted app may run from another folder.
        paths = {}
        for key in ("path", "val_path"):
            value = getattr(cfg.data, key)
            if value and not Path(value).is_absolute():
                paths[key] = str(shipped_file(value))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **paths))
        (path / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        run = Run(run_id, path)
        run.emit("status", status="created")
        return run

    def list(self) -> list[Run]:
        runs = [Run(p.name, p) for p in self.root.iterdir() if (p / "config.yaml").exists()]
        return sorted(runs, key=lambda r: r.events_path.stat().st_mtime if r.events_path.exists() else 0,
                      reverse=True)

    def active(self) -> Run | None:
        """The run whose worker is alive, if any (one training at a time per machine)."""
        for r in self.list():
            if r.worker_alive() and r.last_status()["status"] in LIVE:
                return r
        return None
