"""Where a training step's time goes: GPU kernel time against wall time, for one engine variant.

    python -m bench.profile_step --variant studio-graphs-liger --model DIR --data FILE
    python -m bench.profile_step --variant lean@alllinear --model DIR --data LONG_FILE

Runs the engine (``studio.training.Recipe``) with a ``bench.train_speed`` variant's overrides and
profiles 5 optimizer steps after 8 warm-up steps with ``torch.profiler``: prints wall seconds per step,
summed CUDA kernel time per step (the GPU-busy floor of this code), and the top kernels and CPU ops.
A wall time far above the kernel time means the host (Python, launches, syncs) is the bottleneck.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="studio-graphs-liger")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--rows", type=int, default=25)
    a = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    from bench.train_speed import studio_config, variant_overrides
    from studio.runs import RunStore
    from studio.training import Recipe

    shape = "@" in a.variant  # a speed-issue shape: long steps, so fewer of them
    wait, active = (3, 2) if shape else (8, 5)
    cfg = studio_config(a.variant, a.model, a.data, wait + active + 3, variant_overrides(a.variant)).replace(
        {"train.logging_steps": 5})
    recipe = Recipe(RunStore().create(cfg, "profile-" + a.variant.replace("@", "-at-")))
    recipe.setup()
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=wait, warmup=1, active=active, repeat=1))
    marks = []

    class Prof(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            prof.start()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            marks.append(time.perf_counter())
            prof.step()

        def on_train_end(self, args, state, control, **kw):
            prof.stop()

    recipe.trainer.add_callback(Prof())
    recipe.train()
    wall = (marks[wait - 1] - marks[1]) / (wait - 2) if len(marks) >= wait else float("nan")
    ev = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in ev if e.device_type.name == "CUDA")
    print(f"PROFILE {a.variant}: wall {wall * 1000:.1f} ms/step (unprofiled steps 3-{wait}), "
          f"CUDA kernels {kernel_us / active / 1000:.1f} ms/step ({active} profiled steps)")
    print(ev.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    print(ev.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
