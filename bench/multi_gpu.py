"""The same QLoRA run on 1 GPU and on N GPUs (data parallel through ``accelerate launch``).

    python -m bench.multi_gpu --gpus 2          # on a machine with 2 GPUs

Uses a random-weight Mistral-7B-shaped model cut to ``--layers`` layers (same width, so per-layer
work is real; fewer layers keep the call short), synthetic data from ``bench.common``, and the
studio's own worker (``studio.worker.start``) for both runs with the same effective batch
(per-GPU batch halves when GPUs double).  Prints tokens/s of each, per-GPU peak memory and how
closely the loss curves agree (different GPUs see different example orders, so they agree in
trend and level, not bit for bit); writes JSON.

Each run's adapter is then checked as a user would use it: its tensors counted and whether every LoRA
weight left its initial value, and its eval loss on the held-out examples recomputed with plain
transformers + peft (``reload_eval_loss``) beside the eval loss the run logged.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def adapter_tensors(folder) -> dict:
    """How many tensors the saved adapter holds, and how many LoRA B matrices left their zero start."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        b = [k for k in keys if "lora_B" in k]
        return {"tensors": len(keys), "lora_B": len(b), "lora_B_trained": sum(bool(f.get_tensor(k).any()) for k in b)}


def reload_eval_loss(run, model_dir) -> dict:
    """The run's adapter loaded with plain transformers + peft onto the 4-bit base: eval loss on the run's
    held-out examples, batched as the run's evaluation batched them (per-GPU batch size, in order: under
    several GPUs each rank takes whole batches in turn, so the batches are the same), with and without it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq

    from studio.data.pipeline import prepare

    cfg = run.config()
    tok = AutoTokenizer.from_pretrained(str(run.adapter_dir))
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                           bnb_4bit_use_double_quant=cfg.model.double_quant)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=q, device_map={"": 0},
                                                dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(run.adapter_dir)).eval()
    val = prepare(cfg, tok).validation
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, return_tensors="pt")
    b = cfg.train.batch_size

    def loss() -> float:
        total, n = 0.0, 0
        for i in range(0, len(val), b):
            batch = {k: v.cuda() for k, v in collate([val[j] for j in range(i, min(i + b, len(val)))]).items()}
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                total += float(model(**batch).loss) * len(batch["input_ids"])
            n += len(batch["input_ids"])
        return total / n

    tuned = loss()
    with model.disable_adapter():
        untuned = loss()
    logged = [e["eval_loss"] for e in run.all_events() if e["type"] == "eval"]
    del model, base
    torch.cuda.empty_cache()
    return {"reloaded_eval_loss": tuned, "base_eval_loss": untuned, "logged_eval_loss": logged[-1] if logged else None}


def one_run(store, cfg, name, model_dir=None):
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
    out = {"status": status, "run": run.id, "tokens_per_s": tps, "losses": losses,
           "peak_alloc_gib_rank0": max(e["memory"]["peak"] for e in metrics) / 2**30,
           "gpu_used_gib": [round(g["used"] / 2**30, 2) for g in gpus],
           "adapter": adapter_tensors(run.adapter_dir),
           "adapter_files": sorted(p.name for p in run.adapter_dir.iterdir())}
    if model_dir is not None:
        out.update(reload_eval_loss(run, model_dir))
    return out


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
        "model.base_model": str(model), "model.compute_dtype": "bf16", "data.path": str(data), "data.hub_dataset": "",
        "data.mapping": {},
        "data.train_samples": 0, "data.val_samples": 32, "data.max_length": 512, "train.max_steps": a.steps,
        "train.logging_steps": 1, "train.eval_steps": 0, "train.save_steps": 0, "train.sample_prompts": 0,
        "train.grad_accum": 1, "output.adapter_dir": "", "lora.dropout": 0.0})
    store = RunStore()
    res = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "layers": a.layers,
           "effective_batch": eff, "runs": {}}
    variants = [(1, False), (a.gpus, False)] + ([(a.gpus, True)] if a.fsdp else [])
    for n, fsdp in variants:
        key = f"{n}gpu" + ("-fsdp" if fsdp else "")
        cfg = base.replace({"train.num_gpus": n, "train.batch_size": eff // n, "train.fsdp": fsdp})
        res["runs"][key] = one_run(store, cfg, f"mgpu-{key}", model)
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
    print(f"\n| run | tokens/s | peak alloc rank 0 | loss vs 1 GPU (max per-step diff) | adapter | eval loss: logged / "
          "reloaded with peft / base |\n|---|---:|---:|---:|---|---|")
    for key, r in res["runs"].items():
        if "losses" not in r:
            print(f"| {key} | {r['status']} | | | | |")
            continue
        steps = sorted(set(res["runs"]["1gpu"].get("losses", {})) & set(r["losses"]))
        diff = max(abs(res["runs"]["1gpu"]["losses"][s] - r["losses"][s]) for s in steps) if steps else float("nan")
        ad = r["adapter"]
        print(f"| {key} | {r['tokens_per_s']:,.0f} | {r['peak_alloc_gib_rank0']:.2f} GiB | "
              f"{'—' if key == '1gpu' else f'{diff:.4f}'} | {ad['tensors']} tensors, {ad['lora_B_trained']}/"
              f"{ad['lora_B']} B trained | {r['logged_eval_loss']:.4f} / {r['reloaded_eval_loss']:.4f} / "
              f"{r['base_eval_loss']:.4f} |", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"multi_gpu-{res['date']}-{a.gpus}x{res['gpu'].replace(' ', '_')}.json"
    for d in [out] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
        (d / name).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
