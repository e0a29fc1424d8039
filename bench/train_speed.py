"""Training speed and memory on the GPU: the shipped presets through the CLI worker, beside the seed script, plain HF
and Unsloth, in one call.

    python -m bench.train_speed --group fast        # the fast job: seed script vs `studio train --preset ...fast`
    python -m bench.train_speed --group thorough    # 4096-token rows: hf, unsloth, the thorough preset, matmul rate

Builds a random-weight Mistral-7B (the real architecture; no hub there) and synthetic Alpaca-style data with the
length distribution of ``bench.common``.  Every variant runs in its own process, so peak memory is its own:

- ``seed``: the fast recipe as hand-written (``bench.seed_recipe``), timed over ``--seed-steps`` steps; its whole
  job is its load time + 2,500 optimizer steps (20,000 examples / 8) x seconds per step.
- ``preset:NAME``: ``python -m studio train --preset NAME --data FILE --set model.base_model=MODEL`` exactly as a
  user runs it (the planner picks the path for this GPU; nothing else is set), timed from the command's start to
  its exit.  For the fast preset that is the whole 20,000-example job: data, load, 2,500 steps, evaluations,
  sample answers, checkpoints and the adapter.  ``--steps N`` stops a preset after N steps (its job is then
  extrapolated like the seed's).
- ``hf`` / ``unsloth``: plain transformers + peft + bitsandbytes, and Unsloth (``bench.shapes``), on exactly the
  token rows the studio trains (its own tokenization of the same file), at the preset's settings, dropout
  included.  Unsloth runs where ``UNSLOTH_DIR`` names a folder holding it (``pip install --no-deps --target DIR
  unsloth==2026.10.9 unsloth_zoo torchao tyro trl==1.15.0 docstring-parser typeguard cut-cross-entropy msgspec``,
  then delete ``DIR/studio``, its web UI, which would shadow this package).
- ``matmul``: the GPU's bf16 matrix rate on a Mistral MLP shape, for the FLOP ceiling (6N FLOP a token with
  recompute, N the model's parameters).

Prints the table and writes JSON (date, GPU, every number) to ``--out`` and ``$OUT``.  No test asserts any of them.
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
FAST_JOB_STEPS = math.ceil(FAST_JOB_EXAMPLES / 8)
GROUPS = {"fast": "seed,preset:mistral-7b-finance-fast",
          "thorough": "matmul,hf@thorough,unsloth@thorough,preset:mistral-7b-instruct-thorough"}


def preset_command(preset: str, model: str, data: str, steps: int = 0) -> list[str]:
    """What a user types, with the bench's model folder and data file (and a step limit for a partial run)."""
    cmd = [sys.executable, "-m", "studio", "train", "--preset", preset, "--data", data, "--name",
           "bench-" + preset, "--set", f"model.base_model={model}"]
    if steps:  # a partial run logs every step so its steady state can be timed
        cmd += ["--set", f"train.max_steps={steps}", "--set", "train.logging_steps=1"]
    return cmd


def preset_config(preset: str, model: str, data: str, steps: int, sets: list[str] | None = None):
    """The config ``preset_command`` makes the CLI build (the diagnostics in bench/ run it in-process), plus
    ``--set`` style overrides."""
    from studio.cli import _config, parser

    cmd = preset_command(preset, model, data, steps)[3:] + [x for s in sets or [] for x in ("--set", s)]
    return _config(parser().parse_args(cmd))


def run_preset(preset: str, model: str, data: str, home: Path, steps: int, timeout: int) -> dict:
    """The preset through the CLI worker; numbers from its run folder's events."""
    from studio.runs import RunStore

    env = {**os.environ, "STUDIO_HOME": str(home)}
    t0 = time.perf_counter()
    p = subprocess.run(preset_command(preset, model, data, steps), capture_output=True, text=True, timeout=timeout,
                       env=env)
    wall = time.perf_counter() - t0
    os.environ["STUDIO_HOME"] = str(home)
    run = RunStore().get("bench-" + preset)
    evs = run.all_events()
    metrics = [e for e in evs if e["type"] == "metric"]
    status = run.last_status()
    if status.get("status") != "completed" or len(metrics) < 4:
        return {"error": f"{status.get('status')}: {status.get('message', '')} {p.stderr[-1500:]}"}
    t = {e["status"]: e["t"] for e in evs if e["type"] == "status"}
    a, b = metrics[min(2, len(metrics) - 2)], metrics[-1]  # past the first windows' warm-up (graph capture)
    sps = (b["elapsed"] - a["elapsed"]) / (b["step"] - a["step"])
    tps = (b["tokens_seen"] - a["tokens_seen"]) / (b["elapsed"] - a["elapsed"])
    mem = max(metrics, key=lambda e: e["memory"].get("peak", 0))["memory"]
    plan = next(e for e in evs if e["type"] == "plan")
    evals = [e for e in evs if e["type"] == "eval"]
    out = {"command": " ".join(preset_command(preset, "MODEL", "DATA", steps)), "wall_s": wall,
           "load_s": t["running"] - t["starting"], "steps": b["step"], "s_per_step": sps, "tokens_per_s": tps,
           "peak_alloc_gib": mem.get("peak", 0) / 2**30, "peak_reserved_gib": mem.get("peak_reserved", 0) / 2**30,
           "plan": plan.get("device", "") + ": " + summary(plan), "evaluations": len(evals),
           "final_loss": b["loss"], "train_s": b["elapsed"]}
    if "fast" in preset:  # the whole job measured, or a partial one extrapolated like the seed's
        out["time_to_adapter_s"] = wall if not steps else out["load_s"] + FAST_JOB_STEPS * sps
    if os.environ.get("OUT"):  # the run's own record, for where the time went
        Path(os.environ["OUT"], f"events-{preset}.jsonl").write_text(run.events_path.read_text())
    return out


def summary(plan_event: dict) -> str:
    from studio.speed.plan import LABELS

    on = [label for key, label in LABELS.items() if plan_event.get(key) is True]
    return f"micro-batch {plan_event.get('micro_batch')} x {plan_event.get('grad_accum')}, " + ", ".join(on)


def studio_rows(preset: str, model: str, data: str, n: int, out: Path) -> Path:
    """The token rows the studio trains for ``preset`` on ``data`` (its own template and tokenization), for hf and
    Unsloth to train the very same tokens."""
    from studio import modeling
    from studio.data.pipeline import prepare
    from studio.presets import load_preset

    cfg = load_preset(preset).replace({"model.base_model": model, "data.path": data, "data.mapping": {},
                                       "data.val_fraction": 0.0, "data.val_samples": 0})
    prepared = prepare(cfg, modeling.load_tokenizer(cfg))
    rows = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in prepared.train][:n]
    out.write_text(json.dumps(rows))
    return out


def matmul_rate() -> dict:
    """bf16 TFLOP/s of a Mistral MLP matmul at 16k tokens (mean of 20 after 5 warm-ups)."""
    import torch

    a = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ w
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ w
    torch.cuda.synchronize()
    s = (time.perf_counter() - t) / 20
    return {"tflops": 2 * 16384 * 4096 * 14336 / s / 1e12}


def one(args) -> None:
    """One variant in this process (the driver starts one process per variant)."""
    if args.variant == "seed":
        from bench.seed_recipe import run

        res = run(args.model, args.data, args.steps)
        res["time_to_adapter_s"] = res["load_s"] + FAST_JOB_STEPS * res["s_per_step"]
    elif args.variant == "matmul":
        res = matmul_rate()
    else:
        from bench.shapes import run

        backend, shape = args.variant.split("@")
        res = run(backend, shape, args.model, rows_file=args.rows)
    print("RESULT " + json.dumps(res, default=str), flush=True)


def drive(args) -> None:
    import torch

    from bench.common import random_model, synthetic_alpaca

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model = str(random_model(work / "mistral-7b-random"))
    results = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "group": args.group,
               "model": "Mistral-7B-v0.1 shape, random weights", "model_build_s": time.perf_counter() - t,
               "torch": torch.__version__, "variants": {}}
    if args.group == "fast":
        data = str(synthetic_alpaca(work / "fast.jsonl", FAST_JOB_EXAMPLES + 1000, seed=1))
    else:
        data = str(synthetic_alpaca(work / "long.jsonl", 400, seed=2, long_rows=3900))
    rows = None
    for variant in (args.variants or GROUPS[args.group]).split(","):
        print(f"--- {variant}", flush=True)
        try:
            if variant.startswith("preset:"):
                res = run_preset(variant[7:], model, data, work / "home", args.steps, args.timeout)
            else:
                if "@" in variant and rows is None:
                    rows = studio_rows("mistral-7b-instruct-thorough", model, data, 200, work / "rows.json")
                cmd = [sys.executable, "-m", "bench.train_speed", "--one", "--variant", variant, "--model", model,
                       "--data", data, "--steps", str(args.seed_steps), "--rows", str(rows or "")]
                env = dict(os.environ)
                if variant.startswith("unsloth") and os.environ.get("UNSLOTH_DIR"):  # its own trl, apart from ours
                    env["PYTHONPATH"] = os.environ["UNSLOTH_DIR"] + os.pathsep + env.get("PYTHONPATH", "")
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
                res = json.loads(line[7:]) if line else {"error": (p.stdout[-800:] + p.stderr[-1500:])}
        except subprocess.TimeoutExpired:
            res = {"error": f"over {args.timeout} s"}
        results["variants"][variant] = res
        print(json.dumps(res, default=str), flush=True)
        save(results, args.out)
    table(results)
    save(results, args.out)


def save(results: dict, out_dir: str) -> None:
    """Written after every variant, so a call cut off at its time limit still leaves what it measured."""
    name = f"train_speed-{results['date']}-{results['gpu'].replace(' ', '_')}-{results['group']}.json"
    for d in filter(None, (out_dir, os.environ.get("OUT"))):
        Path(d).mkdir(parents=True, exist_ok=True)
        Path(d, name).write_text(json.dumps(results, indent=1, default=str))


N_PARAMS = 7.24e9  # Mistral-7B


def table(results: dict) -> None:
    """The fast job against the seed script (time to adapter); the thorough preset against hf, Unsloth and the
    GPU's FLOP ceiling."""
    v = results["variants"]
    print(f"\n{results['gpu']}, {results['date']}, group {results['group']}")
    print(f"{'variant':36s} {'tokens/s':>9s} {'peak alloc':>10s} {'peak resv':>9s} {'to adapter':>10s} {'ratio':>7s}")
    seed, hf, un = v.get("seed", {}), v.get("hf@thorough", {}), v.get("unsloth@thorough", {})
    rate = v.get("matmul", {}).get("tflops")
    for name, r in v.items():
        if "error" in r:
            print(f"{name:36s} error: {str(r['error'])[-200:]}")
            continue
        if name == "matmul":
            print(f"{'matmul (bf16, 16384x4096x14336)':36s} {r['tflops']:.0f} TFLOP/s; ceiling at 6N FLOP/token: "
                  f"{r['tflops'] * 1e12 / (6 * N_PARAMS):,.0f} tokens/s")
            continue
        tta = r.get("time_to_adapter_s")
        ratio = ""
        if "fast" in name and tta and seed.get("time_to_adapter_s"):
            ratio = f"{seed['time_to_adapter_s'] / tta:.2f}x seed"
        elif "thorough" in name and not name.startswith("hf") and hf.get("tokens_per_s"):
            ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x hf"
            if name.startswith("preset") and un.get("tokens_per_s"):
                ratio += f", {r['tokens_per_s'] / un['tokens_per_s']:.2f}x unsloth"
            if name.startswith("preset") and rate:
                ratio += f", {r['tokens_per_s'] * 6 * N_PARAMS / (rate * 1e12):.0%} of the FLOP ceiling"
        print(f"{name:36s} {r['tokens_per_s']:9.0f} {r['peak_alloc_gib']:8.2f}Gi {r['peak_reserved_gib']:7.2f}Gi "
              f"{(f'{tta / 60:7.1f}min' if tta else '-'):>10s} {ratio}")
        if r.get("plan"):
            print(f"{'':36s} plan: {r['plan']}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--group", choices=list(GROUPS), default="fast")
    p.add_argument("--variants", help="comma-separated, instead of the group's")
    p.add_argument("--one", action="store_true")
    p.add_argument("--variant")
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--rows", default="")
    p.add_argument("--steps", type=int, default=0, help="stop each preset after this many steps (0: its whole job "
                   "for the fast preset; give one for the thorough preset's 5 epochs)")
    p.add_argument("--seed-steps", type=int, default=40, help="steps timed for the seed script, hf and Unsloth")
    p.add_argument("--timeout", type=int, default=480, help="seconds allowed to one variant")
    p.add_argument("--work", default="/tmp/qlora-bench")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args()
    one(a) if a.one else drive(a)


if __name__ == "__main__":
    main()
