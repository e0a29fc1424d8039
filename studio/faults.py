"""Fault injection, so tests can prove what happens on failures that a CPU cannot produce on demand.

``STUDIO_FAULTS`` holds comma-separated ``kind@step`` items, read by the training worker:

- ``nan@N``: before optimizer step N, one LoRA weight becomes NaN (the loss then really is NaN, and
  the recipe's real NaN handling runs);
- ``oom@N``: step N raises ``torch.OutOfMemoryError`` as CUDA would;
- ``crash@N``: the worker process dies with SIGKILL at step N (as when the machine's OOM killer hits).

Unset in normal use; nothing here runs unless the variable is set.
"""

from __future__ import annotations

import os


def planned() -> dict[str, int]:
    out = {}
    for item in os.environ.get("STUDIO_FAULTS", "").split(","):
        if "@" in item:
            kind, step = item.strip().split("@", 1)
            out[kind] = int(step)
    return out


def before_step(step: int, model) -> None:
    """Called by the training callback before optimizer step ``step`` (1-based)."""
    faults = planned()
    if not faults:
        return
    import torch

    if faults.get("nan") == step:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(float("nan"))
                    break
    if faults.get("oom") == step:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by STUDIO_FAULTS)")
    if faults.get("crash") == step:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
