"""Where a training step's time goes: GPU kernel time against wall time, for a preset as the CLI builds it.

    python -m bench.profile_step --preset mistral-7b-finance-fast --model DIR --data FILE
    python -m bench.profile_step --preset mistral-7b-instruct-thorough --model DIR --data LONG_FILE [--set K=V]

Runs the engine (``studio.training.Recipe``) on the config ``studio train`` would build (planned for this GPU;
``--set`` pins a part) and
profiles 5 optimizer steps after 8 warm-up steps with ``torch.profiler``: prints wall seconds per step,
summed CUDA kernel time per step (the GPU-busy floor of this code), and the top kernels and CPU ops.
A wall time far above the kernel time means the host (Python, launches, syncs) is the bottleneck.
``--samples`` then times the sample answers an evaluation writes, and profiles one round of them.
``--gaps`` also exports the trace and prints where the compute stream sits idle (``idle_gaps``): each gap
is "starved" (the next kernel was launched late: the host was busy or blocked, and on what) or "waiting"
(launched in time, held back by a wait on another stream, such as an offloaded tensor's copy).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import time


def idle_gaps(trace: dict, min_us: float = 20.0) -> dict:
    """Idle time of the busiest kernel stream in a ``torch.profiler`` chrome trace, by cause.

    Returns ``{"stream", "span_us", "busy_us", "idle_us", "causes": [(cause, us, count)...], "largest": [...]}``
    with causes sorted by idle time.  A gap's cause is "starved: <host call blocking during it>" when the next
    kernel's launch came after the gap began, else "waiting: before <next kernel>"."""
    ev = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    kernels = collections.defaultdict(list)
    for e in ev:
        if e.get("cat") == "kernel":
            kernels[e["args"].get("stream")].append(e)
    if not kernels:
        return {"stream": None, "span_us": 0, "busy_us": 0, "idle_us": 0, "causes": [], "largest": []}
    stream = max(kernels, key=lambda k: sum(e["dur"] for e in kernels[k]))
    ks = sorted(kernels[stream], key=lambda e: e["ts"])
    launch = {e["args"]["correlation"]: e for e in ev if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    host = sorted((e for e in ev if e.get("cat") in ("cuda_runtime", "cpu_op")), key=lambda e: e["ts"])
    starts = [h["ts"] for h in host]
    causes = collections.defaultdict(lambda: [0.0, 0])
    largest = []
    for a, b in zip(ks, ks[1:]):
        start, end = a["ts"] + a["dur"], b["ts"]
        if end - start < min_us:
            continue
        gap = end - start
        call = launch.get(b["args"].get("correlation"))
        # Until the launch call returned the GPU could not have run the kernel (starved); after it, it was held
        # back by something queued before it (waiting).
        starved = min(gap, max(0.0, call["ts"] + call["dur"] - start)) if call is not None else 0.0
        blocker = "host busy (python)"
        if starved > 0:
            i = bisect.bisect_right(starts, start + 0.1 * starved)
            # The shortest host call running through most of the starved time: what kept the host from launching.
            over = [h for h in host[max(0, i - 3000):i] if h["ts"] + h["dur"] >= start + 0.9 * starved]
            if over:
                blocker = min(over, key=lambda h: h["dur"])["name"]
        parts = {f"starved: {blocker}": starved, f"waiting: before {b['name'][:50]}": gap - starved}
        for cause, us in parts.items():
            if us > 0:
                causes[cause][0] += us
                causes[cause][1] += 1
        largest.append((gap, max(parts, key=parts.get), a["name"][:40], b["name"][:40]))
    busy = sum(e["dur"] for e in ks)
    span = ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]
    return {"stream": stream, "span_us": span, "busy_us": busy, "idle_us": span - busy,
            "causes": sorted(((c, us, n) for c, (us, n) in causes.items()), key=lambda t: -t[1]),
            "largest": sorted(largest, reverse=True)[:10]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="mistral-7b-finance-fast")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as studio train's --set")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--gaps", action="store_true", help="print the compute stream's idle gaps by cause")
    p.add_argument("--samples", action="store_true", help="then time and profile the sample answers each evaluation "
                   "writes (train.sample_prompts greedy answers of train.sample_max_new_tokens tokens)")
    a = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    from bench.train_speed import preset_config
    from studio.runs import RunStore
    from studio.training import Recipe

    cfg = preset_config(a.preset, a.model, a.data, 1, a.set)
    long_rows = cfg.data.max_length > 512  # long steps, so fewer of them
    wait, active = (3, 2) if long_rows else (8, 5)
    cfg = cfg.replace({"train.max_steps": wait + active + 3, "train.logging_steps": 5})
    recipe = Recipe(RunStore().create(cfg, "profile-" + a.preset))
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
    kernel_us = _kernel_us(ev)
    print(f"PROFILE {a.preset} {' '.join(a.set)}: wall {wall * 1000:.1f} ms/step (unprofiled steps 3-{wait}), "
          f"CUDA kernels {kernel_us / active / 1000:.1f} ms/step ({active} profiled steps)")
    print(ev.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    print(ev.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    if a.gaps:
        path = "/tmp/profile-trace.json"
        prof.export_chrome_trace(path)
        g = idle_gaps(json.load(open(path)))
        print(f"GAPS stream {g['stream']}: span {g['span_us'] / 1e3 / active:.1f} ms/step, busy "
              f"{g['busy_us'] / 1e3 / active:.1f}, idle {g['idle_us'] / 1e3 / active:.1f} ms/step")
        for cause, us, n in g["causes"][:15]:
            print(f"  {us / 1e3 / active:8.2f} ms/step  {n / active:7.1f}/step  {cause}")
        for us, cause, before, after in g["largest"]:
            print(f"  gap {us / 1e3:7.2f} ms  {cause}  [{before} -> {after}]")

    if a.samples:
        samples(recipe)


def _kernel_us(events) -> float:
    """Microseconds of CUDA kernels in a profile's ``key_averages()``."""
    return sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")


def samples(recipe) -> None:
    """Wall time of the sample answers as an evaluation writes them (after the steps above: the model as it is
    mid-run), and where one round of them spends it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    model, cfg = recipe.trainer.model, recipe.cfg.train
    tokens = len(recipe.sample_examples) * cfg.sample_max_new_tokens
    for i in range(3):
        t = time.perf_counter()
        recipe.emit_samples(model, 0)
        torch.cuda.synchronize()
        s = time.perf_counter() - t
        print(f"SAMPLES round {i}: {s:.2f} s for {len(recipe.sample_examples)} x {cfg.sample_max_new_tokens} tokens "
              f"({s / cfg.sample_max_new_tokens * 1000:.1f} ms a decoding step)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        recipe.emit_samples(model, 0)
        torch.cuda.synchronize()
    ev = prof.key_averages()
    kernel_us = _kernel_us(ev)
    print(f"SAMPLES profiled: CUDA kernels {kernel_us / cfg.sample_max_new_tokens / 1000:.1f} ms a decoding step "
          f"({tokens} tokens)")
    print(ev.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(ev.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
