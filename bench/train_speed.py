"""Training speed and memory on the GPU: the seed recipe as written against the studio's paths.

    python -m bench.train_speed --out bench/results            # on the GPU machine

Builds a random-weight Mistral-7B (the real architecture; no hub there), writes synthetic data with
the length distribution stated in ``bench.common``, and runs each variant in its own process so
peak memory is measured cleanly:

- ``seed``: the fast recipe exactly as hand-written (``bench.seed_recipe``: padded to 128).
- ``studio``: the studio's engine with the preset unchanged (dynamic padding per batch).
- ``studio-fast``: the same preset with ``train.padding_free`` and ``train.auto_batch``
  (same examples, epochs, learning rate and effective batch in examples).
- ``studio-graphs``: the fast path plus ``train.cuda_graphs`` (decoder layers replayed as CUDA graphs).
- ``hf@SHAPE`` / ``unsloth@SHAPE`` / ``studio@SHAPE``: the speed issue's three shapes (``bench.shapes``)
  on full-length rows: hand-written HF, Unsloth (where its wheels are installed), and the studio's
  engine with its speed options (padding-free, auto micro-batch, Liger, CUDA graphs where the planner
  drops checkpointing).
- ``lean@SHAPE``: the engine at the shape's own batch and checkpointing with the switches that save
  memory or cost none (fused 4-bit LoRA, offloaded checkpoints, Liger, compute-dtype frozen weights,
  nested quantization as Unsloth loads, the checkpointed stack as one CUDA graph on short rows).
- ``lean-up@SHAPE``: lean, eager, with ``model.offload_up_proj`` (up_proj products kept in CPU RAM).
- ``studio-max-fused``: studio-max with ``train.fused_lora`` (the fast preset's LoRA dropout kept).

Prints a table (tokens/s, peak allocated/reserved, time to adapter, ratio to the seed recipe) and
writes JSON with the date and the GPU.  Time to adapter = load time + optimizer steps of the whole
job x measured seconds per step.  No test asserts any of these numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

FAST_JOB_EXAMPLES = 20_000


def studio_shape_overrides(shape: str, backend: str = "studio") -> dict:
    """``studio@``: the shape with every speed option (fills the GPU); ``lean@``: the shape's own batch and
    checkpointing with the options that save memory or cost none (Liger, compute-dtype frozen weights, fused
    4-bit LoRA, nested quantization, offloaded checkpoints or one graphed checkpointed stack); ``lean-up@``:
    lean with each layer's up_proj product kept in CPU RAM instead of recomputed (eager, no graphs)."""
    from bench.shapes import SHAPES

    s = SHAPES[shape]
    shape_cfg = {"model.compute_dtype": "bf16", "model.double_quant": s["nested"],
                 "model.gradient_checkpointing": True, "lora.r": s["r"], "lora.alpha": s["alpha"], "lora.dropout": 0.0,
                 "lora.target_modules": s["targets"], "train.batch_size": s["batch"], "train.grad_accum": s["accum"],
                 "data.max_length": s["seq"], "data.train_on_inputs": True, "train.liger": True,
                 "model.fp32_frozen": False}  # full-length rows: nothing for padding-free packing to remove
    if backend in ("lean", "lean-up"):
        # Unsloth's memory at every shape: it loads with nested quantization whatever the shape says, and so do
        # we here.  Saved layer inputs live in CPU RAM; short micro-batches are host-bound, so their checkpointed
        # stack is one CUDA graph.
        short = s["batch"] * s["seq"] <= 4096
        lean = {**shape_cfg, "model.double_quant": True, "train.fused_lora": True, "train.cuda_graphs": short,
                "model.offload_checkpoints": True}
        return lean if backend == "lean" else {**lean, "train.cuda_graphs": False, "model.offload_up_proj": True}
    return {**shape_cfg, "train.auto_batch": True, "train.cuda_graphs": True, "model.dequantized_cache": True}


def studio_config(variant: str, model_dir: str, data: str, steps: int, overrides: dict):
    """The engine's config for a variant: its preset with the bench's data, steps and ``overrides``."""
    from studio.presets import load_preset

    preset = "mistral-7b-instruct-thorough" if "thorough" in variant else "mistral-7b-finance-fast"
    if variant.endswith("-nonreentrant"):  # the other checkpointing mode, for comparison
        from studio import modeling

        modeling.GC_KWARGS = {"use_reentrant": False}
    base = {"model.base_model": model_dir, "data.path": data, "data.hub_dataset": "", "data.mapping": {}, "data.val_samples": 0,
            "data.val_fraction": 0.0, "data.train_samples": 0, "train.max_steps": steps,
            "train.logging_steps": 1 if "@" in variant else 5,
            "train.eval_steps": 0, "train.save_steps": 0, "train.sample_prompts": 0, "train.tensorboard": False,
            "output.adapter_dir": ""}
    return load_preset(preset).replace({**base, **overrides})


def variant_overrides(variant: str) -> dict:
    if "@" in variant:
        backend, shape = variant.split("@")
        return studio_shape_overrides(shape, backend)
    return VARIANTS[variant]


def run_name(variant: str) -> str:
    """The run folder of a variant (tests check that every variant's is a valid run name)."""
    return "bench-" + variant.replace("@", "-at-")


def run_studio(variant: str, model_dir: str, data: str, steps: int, overrides: dict) -> dict:
    from studio.runs import RunStore
    from studio.training import Recipe

    cfg = studio_config(variant, model_dir, data, steps, overrides)
    run = RunStore().create(cfg, run_name(variant))
    t0 = time.perf_counter()
    status = Recipe(run).execute()
    evs = run.all_events()
    metrics = [e for e in evs if e["type"] == "metric"]
    if len(metrics) < 3:
        last = run.last_status()
        return {"error": f"{last.get('status')}: {last.get('message', '')}"[:400]}
    plan = next((e for e in evs if e["type"] == "plan"), None)
    graphs = next((e for e in evs if e["type"] == "graphs"), None)
    running = next(e for e in evs if e["type"] == "status" and e["status"] == "running")
    load_s = running["t"] - next(e for e in evs if e["type"] == "status" and e["status"] == "starting")["t"]
    w = 2 if "@" in variant else 1  # the first logged windows hold the warm-up steps
    a, b = metrics[w], metrics[-1]
    sps = (b["elapsed"] - a["elapsed"]) / (b["step"] - a["step"])
    tps = (b["tokens_seen"] - a["tokens_seen"]) / (b["elapsed"] - a["elapsed"])
    mem = max(metrics, key=lambda e: e["memory"]["peak"])["memory"]
    return {"status": status, "load_s": load_s, "s_per_step": sps, "tokens_per_s": tps,
            "tokens_per_step": tps * sps, "peak_alloc_gib": mem["peak"] / 2**30,
            "peak_reserved_gib": mem["peak_reserved"] / 2**30, "plan": plan, "graphs": graphs, "wall_s": time.perf_counter() - t0,
            "final_loss": metrics[-1]["loss"]}


VARIANTS = {
    "seed": {},
    "studio": {},
    "studio-nonreentrant": {},
    "studio-fast": {"train.padding_free": True, "train.auto_batch": True},
    "studio-fast-liger": {"train.padding_free": True, "train.auto_batch": True, "train.liger": True},
    "studio-graphs": {"train.padding_free": True, "train.auto_batch": True, "train.cuda_graphs": True},
    "studio-graphs-liger": {"train.padding_free": True, "train.auto_batch": True, "train.cuda_graphs": True,
                            "train.liger": True},
    # Everything: + frozen weights in the compute dtype + the 16-bit weight cache (where memory allows).
    "studio-max": {"train.padding_free": True, "train.auto_batch": True, "train.cuda_graphs": True,
                   "train.liger": True, "model.fp32_frozen": False, "model.dequantized_cache": True},
    # studio-max with the LoRA layers fused (the fast preset's dropout 0.05 included).
    "studio-max-fused": {"train.padding_free": True, "train.auto_batch": True, "train.cuda_graphs": True,
                         "train.liger": True, "model.fp32_frozen": False, "model.dequantized_cache": True,
                         "train.fused_lora": True},
}


def one(args) -> None:
    if args.variant != "seed" and args.variant.split("@")[0] not in ("hf", "unsloth"):
        from studio.worker import ALLOC_CONF

        os.environ.setdefault("PYTORCH_ALLOC_CONF", ALLOC_CONF)  # what the studio's worker process gets
    if args.variant == "seed":
        from bench.seed_recipe import run

        res = run(args.model, args.data, args.steps)
    elif "@" in args.variant:
        backend, shape = args.variant.split("@")
        if backend in ("studio", "lean", "lean-up"):
            from bench.shapes import SHAPES, WARMUP

            res = run_studio(args.variant, args.model, args.data, SHAPES[shape]["steps"] + WARMUP[shape],
                             studio_shape_overrides(shape, backend))
        else:
            from bench.shapes import run

            res = run(backend, shape, args.model)
    else:
        res = run_studio(args.variant, args.model, args.data, args.steps, VARIANTS[args.variant])
    print("RESULT " + json.dumps(res, default=str), flush=True)


def drive(args) -> None:
    import torch

    from bench.common import random_model, synthetic_alpaca

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model = random_model(work / "mistral-7b-random")
    build_s = time.perf_counter() - t
    fast_data = synthetic_alpaca(work / "fast.jsonl", 2000, seed=1)
    long_data = synthetic_alpaca(work / "long.jsonl", 200, seed=2, long_rows=3900)
    gpu = torch.cuda.get_device_name(0)
    results = {"date": time.strftime("%Y-%m-%d"), "gpu": gpu, "model": "Mistral-7B-v0.1 shape, random weights",
               "model_build_s": build_s, "torch": torch.__version__, "variants": {}}
    plan = [(v, long_data if "@" in v else fast_data, args.steps) for v in args.variants.split(",")]
    for variant, data, steps in plan:
        cmd = [sys.executable, "-m", "bench.train_speed", "--one", "--variant", variant, "--model", str(model),
               "--data", str(data), "--steps", str(steps)]
        print(f"--- {variant}", flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                               env={**os.environ, "STUDIO_HOME": str(work / "home")})
        except subprocess.TimeoutExpired:
            print(f"{variant}: over {args.timeout}s, skipped", flush=True)
            results["variants"][variant] = {"error": "timeout"}
            continue
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(p.stdout[-3000:], p.stderr[-3000:], flush=True)
            results["variants"][variant] = {"error": p.stderr[-500:]}
            continue
        res = json.loads(line[7:])
        if "error" in res:
            results["variants"][variant] = res
            print(res, flush=True)
            continue
        if "@" not in variant:
            steps_total = math.ceil(FAST_JOB_EXAMPLES / 8)
            res["time_to_adapter_s"] = res["load_s"] + steps_total * res["s_per_step"]
        results["variants"][variant] = res
        print(json.dumps(res, default=str), flush=True)
        save(results, args.out)
    table(results)
    save(results, args.out)


def save(results: dict, out_dir: str) -> None:
    """Written after every variant, so a call cut off at its time limit still leaves what it measured."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"train_speed-{results['date']}-{results['gpu'].replace(' ', '_')}.json"
    (out / name).write_text(json.dumps(results, indent=1, default=str))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], name).write_text(json.dumps(results, indent=1, default=str))


def table(results: dict) -> None:
    """Fast-job variants against the seed recipe (time to adapter); shape variants against hf@shape."""
    v = results["variants"]
    seed = v.get("seed", {})
    print(f"\n{results['gpu']}, {results['date']}")
    print(f"{'variant':20s} {'tokens/s':>9s} {'s/step':>7s} {'peak alloc':>10s} {'peak resv':>9s} "
          f"{'to adapter':>10s} {'ratio':>7s}")
    for name, r in v.items():
        if "error" in r:
            print(f"{name:20s} error: {str(r['error'])[-60:]}")
            continue
        tta = r.get("time_to_adapter_s")
        if "@" in name:
            ref = v.get("hf@" + name.split("@")[1], {})
            ratio = r["tokens_per_s"] / ref["tokens_per_s"] if ref.get("tokens_per_s") else None
        else:
            ratio = (seed["time_to_adapter_s"] / tta) if tta and seed.get("time_to_adapter_s") else None
        r["ratio"] = ratio
        print(f"{name:20s} {r['tokens_per_s']:9.0f} {r['s_per_step']:7.3f} {r['peak_alloc_gib']:8.2f}Gi "
              f"{r['peak_reserved_gib']:7.2f}Gi {(f'{tta / 60:7.1f}min' if tta else '-'):>10s} "
              f"{(f'{ratio:6.2f}x' if ratio else '-'):>7s}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--one", action="store_true")
    p.add_argument("--variant")
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--timeout", type=int, default=400, help="seconds allowed to one variant")
    p.add_argument("--variants", default="seed,studio,studio-fast,studio-graphs-liger,studio-max,"
                   "hf@fast,unsloth@fast,studio@fast,lean@fast,hf@alllinear,unsloth@alllinear,studio@alllinear,"
                   "lean@alllinear,hf@thorough,unsloth@thorough,studio@thorough,lean@thorough")
    p.add_argument("--work", default="/tmp/qlora-bench")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args()
    one(a) if a.one else drive(a)


if __name__ == "__main__":
    main()
