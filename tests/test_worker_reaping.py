"""The app starts workers as its children: each one that ends is reaped (waited for) by the app itself, so
finished runs leave no zombie processes behind, without anyone calling ``worker.wait``."""

import os
import time

from studio import worker
from studio.presets import load_preset
from studio.runs import RunStore


def _state(pid: int) -> str | None:
    """The process's state letter (Z for a zombie), or None once it is gone (reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_a_finished_worker_is_reaped_without_wait():
    store = RunStore()
    cfg = load_preset("tiny-demo").replace({"train.max_steps": 2, "train.eval_steps": 0, "train.save_steps": 0,
                                             "train.sample_prompts": 0, "train.logging_steps": 1})
    run = worker.start(store, cfg, "reaped")
    pid = run.worker_pid()
    assert pid and pid != os.getpid() and _state(pid) is not None
    end = time.time() + 300
    while run.status not in ("completed", "failed") and time.time() < end:
        time.sleep(0.5)  # watch the run folder as the UI does; never worker.wait()
    assert run.status == "completed", run.last_status()
    end = time.time() + 30
    while _state(pid) is not None and time.time() < end:
        time.sleep(0.2)
    assert _state(pid) is None, f"worker {pid} is still {_state(pid)!r} after its run ended"
