"""Failures as a user reads them: every exception a run can end with becomes a reason, a message and a remedy.

Contract: ``describe(e, step, where)`` returns ``{"reason", "message", "remedy"}`` for any exception (never
raises); ``is_disk_full(e)`` recognises ENOSPC however it arrives (OSError, safetensors' "os error 28", torch's
"file write failed", possibly chained); ``DiskFull`` is the OSError the studio raises itself when a write of its
own meets a full disk, its text naming the place and the remedy.  No gradio, no torch at import.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def mount_of(path: str | Path) -> Path:
    """The mount point holding ``path`` (its nearest existing ancestor's)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def disk_full_remedy(path: str | Path) -> str:
    return (f"free disk space on {mount_of(path)} or move STUDIO_HOME to a larger disk; earlier checkpoints are "
            "kept and the run can be resumed.")


class DiskFull(OSError):
    """A write of the studio's own found the disk full; the text says where and what to do."""

    def __init__(self, path: str | Path, what: str = "writing"):
        self.path = str(path)
        super().__init__(errno.ENOSPC, f"disk full at {path} while {what}: free space on {mount_of(path)} or move "
                                       "STUDIO_HOME to a larger disk.", self.path)

    def __str__(self) -> str:
        return self.strerror


def is_disk_full(e: BaseException | None) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if any(s in text for s in ("No space left on device", "os error 28", "file write failed",
                                   "Disk quota exceeded")):
            return True
        e = e.__cause__ or e.__context__
    return False


def _first_line(e: BaseException, limit: int) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


def describe(e: BaseException, step: int, where: str | Path) -> dict:
    """Reason, message and remedy for a run that ended with ``e`` at ``step``; ``where`` is the run folder."""
    try:
        if is_disk_full(e):
            path = getattr(e, "filename", None) or where
            return {"reason": "disk_full", "message": f"disk full at step {step} ({path}): {_first_line(e, 300)}",
                    "remedy": disk_full_remedy(where)}
        if isinstance(e, OSError):
            return {"reason": "os_error", "message": f"file error at step {step}: {_first_line(e, 300)}",
                    "remedy": "check the file paths and permissions (see logs/worker.log in the run folder)."}
        if isinstance(e, MemoryError):
            return {"reason": "out_of_memory", "message": f"out of CPU memory at step {step}",
                    "remedy": "lower train.batch_size or data.max_length, or close other programs."}
        return {"reason": type(e).__name__, "message": f"{type(e).__name__} at step {step}: {str(e)[:500]}",
                "remedy": "see logs/worker.log in the run folder."}
    except Exception:  # noqa: BLE001 - describing a failure must not fail
        return {"reason": "error", "message": f"the run failed at step {step}", "remedy": "see logs/worker.log."}
