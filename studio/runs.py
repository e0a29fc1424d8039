"""Run directories: the single source of truth for every run, past or live.

Layout of ``<runs root>/<run id>/``::

    config.yaml        resolved RunConfig (no secrets)
    events.jsonl       append-only events: {"t", "type", ...}; types: status, metric, eval, sample,
                       checkpoint, log, error, data, ... (see ``EVENT_FIELDS``)
    final.json         space reserved at creation for the terminal status (see ``Run.finish``)
    worker.pid         pid of the training worker while it may be alive
    STOP               present when a cooperative stop was requested
    checkpoints/       Trainer checkpoints (checkpoint-N/, each complete once trainer_state.json exists)
    adapter/           final adapter + tokenizer (loads with plain peft/transformers)
    logs/worker.log    the worker's stdout/stderr (tokens redacted at the source)

Contract:
- ``RunStore`` maps run ids to folders only through ``security.inside`` after ``check_name``; a run folder
  appears whole (config, reservation, first event) or not at all: it is built under a hidden temporary
  name and renamed.
- ``Run.status`` is derived from the last status event and whether the worker is alive (its pid names a
  ``studio.worker`` process of this folder), so a killed app or worker shows as ``interrupted``.
- Reading never fails on what a folder holds: a line of ``events.jsonl`` that is not UTF-8, not a JSON
  object, or a known type with missing or mistyped fields is skipped and reported in ``Run.warnings()``;
  files that are symlinks, FIFOs, devices or folders are not read (nor written) but reported; a garbled
  ``config.yaml`` raises ``ConfigError`` only from ``Run.config()``.  ``RunStore.list`` lists only run
  folders (valid names, not symlinks, holding a ``config.yaml``).
- Events are appended one JSON line at a time; a torn last line is ignored while the worker may still
  finish it, read as far as it goes once the worker is gone, and never glued to the next line (a writer
  first ends a torn line).
- ``Run.finish`` writes the terminal status into ``final.json`` in place (its blocks were allocated at
  creation, so this needs no free space), gives the rest of the reservation back to the disk, then appends
  the status to ``events.jsonl``.  Readers take the later of the two, so the status stands even when that
  append (or the worker's log) finds the disk full.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from studio.paths import runs_root, shipped_file, studio_home  # noqa: F401  (studio_home: re-exported)
from studio.security import SecurityError, check_name, inside, redact

TERMINAL = ("completed", "failed", "stopped", "halted")
LIVE = ("queued", "starting", "resuming", "running", "stopping")
STATUSES = ("created", *LIVE, *TERMINAL)

FINAL = "final.json"
RESERVE_BYTES = 64 * 1024  # the terminal event plus the worker's last log lines, with room to spare
MAX_READ = 256 * 1024 * 1024  # events read at once; a longer file is read on from where this stops
MAX_CONFIG = 1024 * 1024


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
    if not isinstance(pid, int) or pid <= 0:
        return False  # 0 and negative numbers name process groups, never a worker
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False
    # A zombie child counts as dead: it has exited, only its entry remains.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def is_worker_of(pid: int, run_dir: Path) -> bool:
    """Whether ``pid`` is a training worker (or its launcher) for ``run_dir``: a pid file outlives its process
    and the number is reused, so a stale file must not make another program count as this run's worker."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except FileNotFoundError:
        return not Path("/proc/self").exists() and pid_alive(pid)  # no /proc here: trust the pid
    except OSError:
        return False
    if "studio.worker" not in args:
        return False
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = ""
    want = os.path.realpath(run_dir)
    return any(os.path.realpath(os.path.join(cwd, a)) == want for a in args if "/" in a or a == run_dir.name)


# ---- reading what a run folder holds, whatever it holds ---------------------------------------------

def read_regular(path: Path, limit: int = MAX_READ, offset: int = 0) -> bytes:
    """Up to ``limit`` bytes of a regular file from ``offset``.  A symlink, FIFO, device or folder raises
    OSError instead of being followed or blocking the reader."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if offset:
            os.lseek(fd, offset, os.SEEK_SET)
        chunks, n = [], 0
        while n < limit:
            b = os.read(fd, min(1 << 20, limit - n))
            if not b:
                break
            chunks.append(b)
            n += len(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _why(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "a symlink (not followed)"
    return e.strerror or str(e)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Field kinds: each a test of a value.  Losses and rates may be "nan"/"inf" strings (see ``_clean``).
INT, NUM, STR, BOOL, DICT, LIST = _int, _num, (lambda v: isinstance(v, str)), (lambda v: isinstance(v, bool)), \
    (lambda v: isinstance(v, dict)), (lambda v: isinstance(v, list))


def _opt(*kinds):
    return lambda v: v is None or any(k(v) for k in kinds)


def _step(v) -> bool:
    return _int(v) and v >= 0


def _memory(v) -> bool:
    if not isinstance(v, dict):
        return False
    for k in ("peak", "rss", "used", "total", "allocated", "reserved", "peak_reserved"):
        if k in v and not _opt(NUM)(v[k]):
            return False
    if "device" in v and not _opt(STR)(v["device"]):
        return False
    gpus = v.get("gpus")
    if gpus is not None and not (isinstance(gpus, list) and all(
            isinstance(g, dict) and _opt(INT)(g.get("index")) and _opt(NUM)(g.get("used")) and _opt(NUM)(g.get("total"))
            for g in gpus)):
        return False
    return True


def _final(v) -> bool:
    return isinstance(v, dict) and all(_opt(NUM, STR)(v.get(k)) for k in ("train_loss", "eval_loss")) \
        and _opt(INT)(v.get("step"))


def _stats(v) -> bool:
    return isinstance(v, dict) and isinstance(v.get("summary"), str)


LOSS = _opt(NUM, STR)
# What the readers of each known event type rely on: (test, required).  Extra fields are kept as they are;
# unknown types are kept when their common fields (t, type, step) are sound, so newer workers stay readable.
EVENT_FIELDS: dict[str, dict[str, tuple]] = {
    "status": {"status": (lambda v: v in STATUSES, True), "step": (_step, False), "max_steps": (_opt(INT), False),
               "message": (STR, False), "remedy": (STR, False), "reason": (STR, False),
               "checkpoint": (_opt(STR), False), "final": (_final, False), "pid": (INT, False),
               "epochs": (_opt(NUM), False), "device": (_opt(STR), False), "gpu": (_opt(STR), False)},
    "metric": {"step": (_step, True), "max_steps": (_opt(INT), False), "epoch": (_opt(NUM), False), "loss": (LOSS, False),
               "learning_rate": (LOSS, False), "grad_norm": (LOSS, False), "tokens_per_s": (_opt(NUM), False),
               "tokens_seen": (_opt(NUM), False), "elapsed": (_opt(NUM), False), "memory": (_memory, False)},
    "eval": {"step": (_step, True), "eval_loss": (LOSS, True), "perplexity": (LOSS, False)},
    "sample": {"step": (_step, True), "prompt": (STR, True), "answer": (STR, True), "input": (_opt(STR), False),
               "reference": (_opt(STR), False)},
    "checkpoint": {"step": (_step, True), "path": (STR, True)},
    "log": {"message": (STR, True)},
    "error": {"message": (STR, True)},
    "data": {"train": (INT, True), "validation": (INT, True), "skipped": (_opt(INT), False), "schema": (_opt(STR), False),
             "dropped": (_opt(INT), False), "skipped_first": (_opt(LIST), False), "stats": (_stats, False)},
    "plan": {"micro_batch": (_opt(INT), False), "batch_size": (_opt(INT), False), "grad_accum": (_opt(INT), False),
             "estimate_gib": (_opt(NUM), False), "notes": (_opt(LIST), False), "device": (_opt(STR), False)},
    "graphs": {"layers": (INT, True), "seconds": (NUM, True)},
    "weight_cache": {"gib": (NUM, True)},
    "fused_lora": {"layers": (_opt(INT), False), "shared_buffer_mib": (_opt(NUM), False)},
    "flat_optimizer": {"tensors": (INT, True)},
    "checkpoint_offload": {"layers": (_opt(INT), False), "up_proj": (_opt(INT), False), "host_gib": (_opt(NUM), False),
                           "up_proj_note": (_opt(STR), False)},
    "evaluation": {"n": (_opt(INT), False)},
}


def check_event(ev) -> str | None:
    """Why ``ev`` is not a sound event, or None."""
    if not isinstance(ev, dict):
        return "not a JSON object"
    t = ev.get("t")
    if not _num(t) or not math.isfinite(t):
        return "no time 't'"
    typ = ev.get("type")
    if not isinstance(typ, str):
        return "no 'type'"
    if "step" in ev and not _step(ev["step"]):
        return f"{typ}: 'step' is not a count"
    for name, (test, required) in EVENT_FIELDS.get(typ, {}).items():
        if name not in ev:
            if required:
                return f"{typ}: missing '{name}'"
        elif not test(ev[name]):
            return f"{typ}: '{name}' has the wrong type"
    return None


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_event(raw: bytes) -> tuple[dict | None, str | None]:
    """(event or None, problem or None) for one line."""
    raw = raw.strip()
    if not raw:
        return None, None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not valid UTF-8"
    try:
        ev = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        ev, why = None, "not JSON"
    else:
        why = check_event(ev)
        if why is None and (b"\\ud" in raw or b"\\uD" in raw):
            try:  # an escaped lone surrogate decodes, yet no page, log or terminal can encode it
                json.dumps(ev, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                why = "holds an unpaired surrogate"
        if why is None:
            return ev, None
    # A line torn by a crash and continued by the next write: the event after the tear is still whole.
    cut = raw.rfind(b'{"t": ', 1)
    if cut > 0:
        tail, tail_why = parse_event(raw[cut:])
        if tail is not None:
            return tail, f"{why}; a torn line before an event, which was kept"
    return None, why


_STATUS_PREFIX = re.compile(rb'^\{"t": (\d{1,12}(?:\.\d{1,6})?), "type": "status", "status": "([a-z]+)"')


def salvage_status(raw: bytes) -> dict | None:
    """A status event from a line cut short for good (its worker is gone): its time and status survive."""
    m = _STATUS_PREFIX.match(raw.strip())
    if not m or m.group(2).decode() not in STATUSES:
        return None
    return {"t": float(m.group(1)), "type": "status", "status": m.group(2).decode(), "salvaged": True}


def status_of(events: list[dict], alive: bool) -> str:
    """A run's status from its events: a live status without a living worker means it was interrupted."""
    st = "created"
    for ev in events:
        if ev.get("type") == "status" and ev.get("status") in STATUSES:
            st = ev["status"]
    return "interrupted" if st in LIVE and not alive else st


def with_final(events: list[dict], final: dict | None) -> list[dict]:
    """``events`` with the terminal record of ``final.json`` added when the events file lacks it (the disk was
    full, or its line was torn) and nothing came after it."""
    if final is None:
        return events
    last = None
    for ev in events:
        if ev.get("type") == "status":
            last = ev
    if last is not None and last.get("t") == final["t"] and last.get("salvaged"):
        return [e for e in events if e is not last] + [final]  # the whole record beats its torn copy
    if last is not None and (last.get("t", 0) > final["t"] or
                             (last.get("t") == final["t"] and last.get("status") == final["status"])):
        return events
    return [*events, final]


# ---- writing without following planted links, and surviving a full disk ------------------------------

def _open_regular(path: Path, flags: int, mode: int = 0o644) -> int:
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def _write_all(fd: int, data: bytes) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def append_line(path: Path, data: bytes) -> None:
    """Append one line; if the file ends inside a torn line, end that line first so the two stay apart."""
    fd = _open_regular(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        _write_all(fd, data)
    finally:
        os.close(fd)


def write_in_place(path: Path, data: bytes, shrink: bool = False) -> None:
    """Overwrite a file's bytes without growing it (no new blocks), padding with spaces; with ``shrink``, then
    cut it to ``data`` (its other blocks go back to the disk)."""
    fd = _open_regular(path, os.O_WRONLY)
    try:
        size = os.fstat(fd).st_size
        if len(data) > size:
            raise OSError(errno.EFBIG, f"{len(data)} bytes do not fit the {size} reserved", str(path))
        os.pwrite(fd, data + b" " * (size - len(data)), 0)
        os.fsync(fd)
        if shrink:
            os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def write_new(path: Path, data: bytes) -> None:
    """Create (or replace) a file with ``data``, never through a symlink."""
    fd = _open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


@dataclass
class Run:
    id: str
    dir: Path
    # where -> why, for everything skipped while reading this folder (see ``warnings``)
    problems: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- paths
    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def events_path(self) -> Path:
        return self.dir / "events.jsonl"

    @property
    def final_path(self) -> Path:
        return self.dir / FINAL

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
    def _line(self, type: str, fields: dict) -> tuple[dict, bytes]:
        ev = _clean({"t": round(time.time(), 3), "type": type, **fields})
        return ev, (json.dumps(ev, ensure_ascii=False) + "\n").encode("utf-8")

    def emit(self, type: str, **fields) -> dict:
        ev, line = self._line(type, fields)
        if not is_main_process():
            return ev  # with several GPUs only rank 0 writes the run's history
        append_line(self.events_path, line)
        return ev

    def reserve(self) -> None:
        """(Re)claim the space for the terminal status: ``RESERVE_BYTES`` of real blocks, blank.  A failure
        (a full disk) leaves the previous file as it was."""
        try:
            st = os.lstat(self.final_path)
            if stat.S_ISREG(st.st_mode) and st.st_size >= RESERVE_BYTES:
                write_in_place(self.final_path, b"")
                return
        except FileNotFoundError:
            pass
        tmp = self.final_path.with_name(FINAL + ".new")
        try:
            write_new(tmp, b" " * RESERVE_BYTES)
            os.replace(tmp, self.final_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def finish(self, status: str, **fields) -> dict:
        """Write the terminal status so that it survives a full disk (see the module docstring)."""
        ev, line = self._line("status", {"status": status, **fields})
        if not is_main_process():
            return ev
        if len(line) > RESERVE_BYTES // 2:  # long texts are cut so the record always fits its reservation
            for k in ("message", "remedy"):
                if isinstance(ev.get(k), str):
                    ev[k] = ev[k][:2000]
            ev.pop("final", None)
            line = (json.dumps(ev, ensure_ascii=False) + "\n").encode("utf-8")
        recorded = False
        try:
            # The run is over: the rest of the reservation goes back to the disk (the record stays), so on a full
            # disk the event below and the worker's last log lines have room.  A resume reserves again.
            write_in_place(self.final_path, line, shrink=True)
            recorded = True
        except OSError:
            pass
        try:
            append_line(self.events_path, line)
        except OSError:
            if not recorded:
                raise
        return ev

    def final_record(self) -> dict | None:
        try:
            raw = read_regular(self.final_path, limit=2 * RESERVE_BYTES)
        except FileNotFoundError:
            return None
        except OSError as e:
            self.problems[FINAL] = _why(e)
            return None
        ev, why = parse_event(raw)
        if why:
            self.problems[FINAL] = why
        if ev is None or ev.get("type") != "status" or ev.get("status") not in TERMINAL:
            return None
        return ev

    def events(self, offset: int = 0) -> tuple[list[dict], int]:
        """Sound events from byte ``offset``; returns them and the offset to continue from (a torn last line
        waits for its newline).  Lines that are not sound events are skipped and noted in ``problems``."""
        try:
            data = read_regular(self.events_path, offset=offset)
        except FileNotFoundError:
            return [], offset
        except OSError as e:
            self.problems["events.jsonl"] = _why(e)
            return [], offset
        end = data.rfind(b"\n") + 1
        out, pos = [], offset
        for raw in data[:end].split(b"\n")[:-1]:
            ev, why = parse_event(raw)
            if why:
                self.problems[f"events.jsonl byte {pos}"] = why
            if ev is not None:
                out.append(ev)
            pos += len(raw) + 1
        return out, offset + end

    def tail_events(self, end: int) -> list[dict]:
        """The torn last line from byte ``end``, read once its worker is gone (nothing will complete it)."""
        try:
            data = read_regular(self.events_path, offset=end, limit=MAX_READ)
        except OSError:
            return []
        if not data.strip() or b"\n" in data or self.worker_alive():
            return []
        ev, why = parse_event(data)
        if ev is None:
            ev = salvage_status(data)
            why = "the last line is cut short" + ("; its status was kept" if ev else "")
        if why:
            self.problems[f"events.jsonl byte {end}"] = why
        return [ev] if ev is not None else []

    def complete(self, events: list[dict], end: int) -> list[dict]:
        """Events read up to ``end``, with a torn last line and the terminal record where they belong."""
        return with_final(events + self.tail_events(end), self.final_record())

    def all_events(self) -> list[dict]:
        return self.complete(*self.events(0))

    def warnings(self) -> list[str]:
        """One line per file with something skipped, e.g. ``events.jsonl: 2 lines skipped (byte 0: not JSON)``."""
        lines, skipped = [], [(k, v) for k, v in self.problems.items() if k.startswith("events.jsonl byte")]
        if skipped:
            k, v = skipped[0]
            lines.append(f"events.jsonl: {len(skipped)} line{'s' if len(skipped) > 1 else ''} skipped "
                         f"({k.split(' ', 1)[1]}: {v})")
        lines += [f"{k}: {v}" for k, v in self.problems.items() if not k.startswith("events.jsonl byte")]
        return lines

    def log_tail(self, limit: int = 64 * 1024) -> str:
        """The end of the worker log ("" when it cannot be read: a FIFO or a link is not opened)."""
        try:
            size = os.lstat(self.log_path).st_size
            data = read_regular(self.log_path, limit=limit, offset=max(size - limit, 0))
        except OSError:
            return ""
        return data.decode("utf-8", errors="replace")

    # ---- state
    def worker_pid(self) -> int | None:
        try:
            pid = int(read_regular(self.pid_path, limit=64).decode("ascii").strip())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            self.problems["worker.pid"] = _why(e) if isinstance(e, OSError) else "not a process id"
            return None
        return pid if pid > 0 else None

    def worker_alive(self) -> bool:
        pid = self.worker_pid()
        return pid is not None and pid_alive(pid) and is_worker_of(pid, self.dir)

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
        """The run's RunConfig; ConfigError (naming the file) for anything that is not one."""
        from studio.config import ConfigError
        from studio.presets import parse_yaml

        where = f"{self.id}/config.yaml"
        try:
            raw = read_regular(self.config_path, limit=MAX_CONFIG + 1)
        except OSError as e:
            raise ConfigError("", f"{where}: cannot be read ({_why(e)}).") from None
        if len(raw) > MAX_CONFIG:
            raise ConfigError("", f"{where}: larger than {MAX_CONFIG // 1024} KiB; not a run configuration.")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ConfigError("", f"{where}: not valid UTF-8.") from None
        try:
            return parse_yaml(text, where)
        except ConfigError:
            raise
        except (Exception, RecursionError) as e:  # noqa: BLE001 - any other shape of garbage
            raise ConfigError("", f"{where}: not a run configuration ({type(e).__name__}).") from None

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a checkpoint is complete once trainer_state.json exists)."""
        try:
            if not self.checkpoints_dir.is_dir() or self.checkpoints_dir.is_symlink():
                return []
            found = []
            for p in self.checkpoints_dir.iterdir():
                m = re.fullmatch(r"checkpoint-(\d{1,12})", p.name)
                if m and not p.is_symlink() and p.is_dir() and (p / "trainer_state.json").is_file() \
                        and (p / "adapter_model.safetensors").is_file():
                    found.append((int(m.group(1)), p))
        except OSError:
            return []
        return [p for _, p in sorted(found)]

    def last_checkpoint(self) -> Path | None:
        cks = self.checkpoints()
        return cks[-1] if cks else None

    def has_adapter(self) -> bool:
        try:
            return (self.adapter_dir / "adapter_model.safetensors").is_file()
        except OSError:
            return False

    def summary(self) -> dict:
        from studio.config import ConfigError

        evs = self.all_events()
        metrics = [e for e in evs if e.get("type") == "metric" and "loss" in e]
        evals = [e for e in evs if e.get("type") == "eval"]
        cfg_name = ""
        try:
            cfg_name = self.config().name
        except ConfigError as e:
            self.problems["config.yaml"] = str(e).split(": ", 1)[-1]
        return {
            "id": self.id, "status": status_of(evs, self.worker_alive()), "preset": cfg_name,
            "started": evs[0]["t"] if evs else None,
            "step": max((e["step"] for e in evs if "step" in e), default=0),
            "train_loss": metrics[-1]["loss"] if metrics else None,
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "has_adapter": self.has_adapter(),
            "warnings": self.warnings(),
        }


_PENDING = ".creating-"  # hidden folders of runs being created; a crashed creator's are swept after an hour


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
        """A new run folder with its config, its reserved space and a ``created`` event, all or nothing."""
        from studio.failures import DiskFull, is_disk_full
        from studio.presets import to_yaml

        base = check_name(name or cfg.output.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}", "run name")
        # Absolute data paths: the worker, evaluation and a restarted app may run from another folder.
        paths = {}
        for key in ("path", "val_path"):
            value = getattr(cfg.data, key)
            if value and not Path(value).is_absolute():
                paths[key] = str(shipped_file(value))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **paths))
        self._sweep()
        tmp = self.root / f"{_PENDING}{base}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            tmp.mkdir()
            (tmp / "logs").mkdir()
            write_new(tmp / "config.yaml", to_yaml(cfg).encode("utf-8"))
            staged = Run(base, tmp)
            staged.reserve()
            staged.emit("status", status="created")
            run_id, n = base, 1
            while True:
                path = inside(self.root, run_id)
                if not path.exists() and not path.is_symlink():
                    try:
                        os.rename(tmp, path)  # the folder appears whole, under its final name
                        break
                    except OSError as e:
                        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                            raise
                n += 1
                run_id = f"{base}-{n}"
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and is_disk_full(e):
                raise DiskFull(self.root, "creating the run folder") from e
            raise
        return Run(run_id, path)

    def _sweep(self) -> None:
        try:
            for p in self.root.iterdir():
                if p.name.startswith(_PENDING) and time.time() - p.lstat().st_mtime > 3600:
                    shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass

    def list(self) -> list[Run]:
        """Run folders, newest activity first: valid names, real folders (not symlinks), with a config.yaml."""
        runs = []
        try:
            entries = list(self.root.iterdir())
        except OSError:
            return []
        for p in entries:
            try:
                check_name(p.name, "run id")
                if p.is_symlink() or not p.is_dir():
                    continue
                if not os.access(p, os.R_OK | os.X_OK):  # listed, so that it is not silently missing
                    runs.append((0, Run(p.name, p, {"folder": "cannot be read (permission denied)"})))
                    continue
                if not os.path.lexists(p / "config.yaml"):
                    continue
                st = os.lstat(p / "events.jsonl")
                when = st.st_mtime
            except SecurityError:
                continue
            except OSError:
                when = 0
            runs.append((when, Run(p.name, p)))
        runs.sort(key=lambda x: x[0], reverse=True)
        return [r for _, r in runs]

    def active(self) -> Run | None:
        """The run whose worker is alive, if any (one training at a time per machine)."""
        for r in self.list():
            if r.worker_alive() and r.last_status()["status"] in LIVE:
                return r
        return None
