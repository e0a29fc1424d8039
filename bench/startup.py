"""Where a training worker's first seconds go, before its ``starting`` event: imports and CUDA's start.

``python -m bench.startup`` runs each stage in order in a fresh interpreter (as the worker starts) and prints the
seconds each took; ``--importtime N`` adds the N slowest modules from ``python -X importtime``.  A diagnostic for
the ``queued`` -> ``starting`` gap of ``bench.train_speed``'s events, not a result.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

STAGES = [
    ("python + studio.worker", "import studio.worker"),
    ("torch", "import torch"),
    ("CUDA context", "import torch; torch.cuda.is_available() and torch.zeros(1, device='cuda')"),
    ("studio.training", "from studio.training import recipe_for"),
    ("transformers Trainer + model", "from transformers import Trainer, AutoModelForCausalLM, TrainingArguments"),
    ("peft", "import peft"),
    ("bitsandbytes", "import bitsandbytes"),
    ("liger_kernel", "import importlib.util as u; u.find_spec('liger_kernel') and __import__('liger_kernel.transformers')"),
    ("datasets", "import importlib.util as u; u.find_spec('datasets') and __import__('datasets')"),
]

PROBE = """
import time, sys
t0 = time.perf_counter()
for name, code in STAGES:
    t = time.perf_counter()
    exec(code)
    print(f"{name:32s} {time.perf_counter() - t:6.2f} s", flush=True)
print(f"{'all':32s} {time.perf_counter() - t0:6.2f} s")
"""


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.startup")
    p.add_argument("--importtime", type=int, default=0, help="also list the N slowest imports")
    a = p.parse_args()
    subprocess.run([sys.executable, "-c", f"STAGES = {STAGES!r}\n{PROBE}"], check=True)
    if a.importtime:
        code = "; ".join(c for _, c in STAGES)
        err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True).stderr
        rows = []
        for line in err.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[1].strip().isdigit():
                rows.append((int(parts[1]), parts[2].rstrip()))
        for us, name in sorted(rows, reverse=True)[: a.importtime]:
            print(f"{us / 1e6:6.2f} s cumulative  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
