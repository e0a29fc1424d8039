"""The same QLoRA run on 1 GPU and on N GPUs (data parallel through ``accelerate launch``).

    python -m bench.multi_gpu --gpus 2          # on a machine with 2 GPUs

Uses a random-weight Mistral-7B-shaped model cut to ``--layers`` layers (same width, so per-layer
work is real; fewer layers keep the call short), synthetic data from ``bench.common``, and the
studio's own worker (``studio.worker.start``) for both runs with the same effective batch
(per-GPU batch halves when GPUs double).  Prints tokens/s of each, per-GPU peak memory and how
closely the loss curves agree (different GPUs see different example orders, so they agree in
trend and level, not bit for bit); writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def one_run(store, cfg, name):
    from studio import worker

    run = worker.start(store, cfg, name)
    status = worker.wait(run, timeout=900)
    evs = run.all_events()
    metrics = [e for e in evs if e["type"] == "metric"]
    if status != "completed" or len(metrics) < 6:
        return {"status": status, "last": run.last_status(), "log": run.log_path.read_text()[-2000:]}
    a, b = metrics[2], metrics[-1]
    tps = (b["tokens_seen"] - a["tokens_seen"]) / (b["elapsed"] - a["elapsed"])
    losses = {e["step"]: e["loss"] for e in metrics}
    gpus = metrics[-1]["memory"].get("gpus", [])
    return {"status": status, "tokens_per_s": tps, "losses": losses,
            "peak_alloc_gib_rank0": max(e["memory"]["peak"] for e in metrics) / 2**30,
            "gpu_used_gib": [round(g["used"] / 2**30, 2) for g in gpus]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--fsdp", action="store_true", help="also run QLoRA + FSDP on the GPUs")
    p.add_argument("--work", default="/tmp/qlora-mgpu")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args()
    import torch

    from bench.common import random_model, synthetic_alpaca
    from studio.presets import load_preset
    from studio.runs import RunStore

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["STUDIO_HOME"] = str(work / "home")
    model = random_model(work / "model", layers=a.layers)
    data = synthetic_alpaca(work / "data.jsonl", 3000, seed=5)
    eff = 16
    base = load_preset("mistral-7b-finance-fast").replace({
        "model.base_model": str(model), "model.compute_dtype": "bf16", "data.path": str(data), "data.hub_dataset": "", "data.mapping": {},
        "data.train_samples": 0, "data.val_samples": 0, "data.max_length": 512, "train.max_steps": a.steps,
        "train.logging_steps": 1, "train.eval_steps": 0, "train.save_steps": 0, "train.sample_prompts": 0,
        "train.grad_accum": 1, "output.adapter_dir": "", "lora.dropout": 0.0})
    store = RunStore()
    res = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "layers": a.layers,
           "effective_batch": eff, "runs": {}}
    variants = [(1, False), (a.gpus, False)] + ([(a.gpus, True)] if a.fsdp else [])
    for n, fsdp in variants:
        key = f"{n}gpu" + ("-fsdp" if fsdp else "")
        cfg = base.replace({"train.num_gpus": n, "train.batch_size": eff // n, "train.fsdp": fsdp})
        res["runs"][key] = one_run(store, cfg, f"mgpu-{key}")
        print(key, {k: v for k, v in res["runs"][key].items() if k != "losses"}, flush=True)
    r1, rn = res["runs"]["1gpu"], res["runs"][f"{a.gpus}gpu"]
    if "losses" in r1 and "losses" in rn:
        steps = sorted(set(r1["losses"]) & set(rn["losses"]))
        diffs = [abs(r1["losses"][s] - rn["losses"][s]) for s in steps]
        last = steps[-10:]
        res["agreement"] = {
            "first_loss": [r1["losses"][steps[0]], rn["losses"][steps[0]]],
            "mean_last10": [sum(r1["losses"][s] for s in last) / len(last), sum(rn["losses"][s] for s in last) / len(last)],
            "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
            "speedup": rn["tokens_per_s"] / r1["tokens_per_s"]}
        print(json.dumps(res["agreement"]), flush=True)
    rf = res["runs"].get(f"{a.gpus}gpu-fsdp", {})
    if "losses" in r1 and "losses" in rf:
        steps = sorted(set(r1["losses"]) & set(rf["losses"]))
        res["fsdp_agreement"] = {"max_abs_diff": max(abs(r1["losses"][s] - rf["losses"][s]) for s in steps),
                                 "speedup": rf["tokens_per_s"] / r1["tokens_per_s"]}
        print("fsdp", json.dumps(res["fsdp_agreement"]), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"multi_gpu-{res['date']}-{a.gpus}x{res['gpu'].replace(' ', '_')}.json"
    for d in [out] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
        (d / name).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
