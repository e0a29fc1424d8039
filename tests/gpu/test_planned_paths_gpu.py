"""GPU tier: the path the planner chooses on this GPU learns what the plain path learns.

For each seed preset, the plan ``studio.speed.plan`` makes for this machine (on the fast preset's short rows:
per-layer CUDA graphs, the 16-bit weight cache, fused LoRA, Liger, compute-dtype frozen weights; on the thorough
preset's long rows: checkpointing with inputs and up-projections in CPU RAM, fused LoRA, Liger) is built by the
speed package exactly as a run builds it, and one step on the same batches is compared with the plain path's
(peft's k-bit preparation, checkpointing, nothing else): loss within 1e-2 relative, each LoRA gradient within
5e-2 relative norm (bf16), on a 2-layer model of Mistral-7B's width with nonzero LoRA B."""

import os
from pathlib import Path

import pytest
from gpu_checks import bf16_step

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu


def _build(cfg, plan):
    from studio import modeling, speed

    tok = modeling.load_tokenizer(cfg)
    base = modeling.load_base(cfg, tok, dtype=plan.dtype)
    torch.manual_seed(0)
    model = modeling.add_lora(cfg, base, plan)
    for n, p in model.named_parameters():  # LoRA B starts at zero: give it values so gradients flow everywhere
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    events = []
    speed.prepare_model(model, plan, lambda t, **f: events.append((t, f)))
    model.train()
    speed.callback(plan, cfg.data.max_length, lambda t, **f: events.append((t, f))).on_train_begin(
        None, None, None, model=model)
    return model, tok, dict(events)


def _batch(plan, tok, length, seed):
    from studio import speed

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(plan.micro_batch):
        n = int(torch.randint(length // 4, length + 1, (1,), generator=g))
        ids = torch.randint(3, 30000, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    batch = speed.collator(plan, tok, length)(rows)
    return {k: v.cuda() for k, v in batch.items() if k in ("input_ids", "labels", "attention_mask", "position_ids")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset,length", [("mistral-7b-finance-fast", 128), ("mistral-7b-instruct-thorough", 1024)])
def test_the_planned_path_learns_what_the_plain_path_learns(preset, length):
    from bench.common import random_model
    from studio.hardware import detect
    from studio.presets import load_preset
    from studio.speed import plan as make_plan, reference

    work = Path(os.environ.get("STUDIO_BENCH_WORK", "/tmp/qlora-bench"))
    model_dir = random_model(work / "mistral-7b-width-2-layers", layers=2)
    cfg = load_preset(preset).replace({"model.base_model": str(model_dir), "model.compute_dtype": "bf16",
                                       "lora.dropout": 0.0, "data.max_length": length})
    planned = make_plan(cfg, detect())
    assert planned.liger and planned.fused_lora and not planned.fp32_frozen, planned.summary()
    if length <= 512:
        assert planned.cuda_graphs and not planned.gradient_checkpointing, planned.summary()
    else:
        assert planned.gradient_checkpointing and planned.offload_checkpoints, planned.summary()
    plain = reference(cfg, "cuda", dtype="bf16").with_(micro_batch=planned.micro_batch, grad_accum=planned.grad_accum)
    fast, tok, events = _build(cfg, planned)
    assert ("graphs" in events) == planned.cuda_graphs and ("checkpoint_offload" in events) == (
        planned.offload_checkpoints and not planned.cuda_graphs)
    ref, _, _ = _build(cfg, plain)
    worst_loss, worst_grad = 0.0, 0.0
    for seed in (4, 5):
        batch = _batch(planned, tok, length, seed)
        lr, gr = bf16_step(ref, batch)
        lf, gf = bf16_step(fast, batch)
        worst_loss = max(worst_loss, float((lf - lr).abs() / lr.abs()))
        assert gf.keys() == gr.keys() and gr
        for n in gr:
            worst_grad = max(worst_grad, float((gf[n] - gr[n]).norm() / gr[n].norm()))
    print(f"\nPLANNED PATH {preset} ({planned.summary()}) vs PLAIN: max loss rel diff {worst_loss:.2e}, "
          f"max LoRA grad rel diff {worst_grad:.2e}")
    assert worst_loss < 1e-2 and worst_grad < 5e-2
