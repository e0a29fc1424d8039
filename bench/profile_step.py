"""Where a training step's time goes: GPU kernel time against wall time, for one engine variant.

    python -m bench.profile_step --variant studio-graphs-liger --model DIR --data FILE

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

    from bench.train_speed import VARIANTS
    from studio.presets import load_preset
    from studio.runs import RunStore
    from studio.training import Recipe

    cfg = load_preset("mistral-7b-finance-fast").replace({
        "model.base_model": a.model, "data.path": a.data, "data.hub_dataset": "", "data.val_samples": 0,
        "data.val_fraction": 0.0, "data.train_samples": 0, "train.max_steps": 16, "train.logging_steps": 5,
        "train.eval_steps": 0, "train.save_steps": 0, "train.sample_prompts": 0, "output.adapter_dir": "",
        **VARIANTS[a.variant]})
    recipe = Recipe(RunStore().create(cfg, "profile-" + a.variant))
    recipe.setup()
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=8, warmup=2, active=5, repeat=1))
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
    wall = (marks[7] - marks[2]) / 5 if len(marks) > 7 else float("nan")
    ev = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in ev if e.device_type.name == "CUDA")
    print(f"PROFILE {a.variant}: wall {wall * 1000:.1f} ms/step (unprofiled steps 4-8), "
          f"CUDA kernels {kernel_us / 5 / 1000:.1f} ms/step (profiled steps 11-15)")
    print(ev.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    print(ev.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
