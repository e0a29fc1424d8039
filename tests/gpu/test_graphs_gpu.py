"""GPU tier: CUDA-graphed decoder layers compute the same step as the eager model.

On a random-weight model of Mistral-7B's width (2 layers, NF4, bf16, LoRA on q,v), fixed-shape
[8, 128] micro-batches of right-padded examples: the graphed loss equals the eager loss within 1e-3 relative, and every LoRA gradient's
relative error ||g_graph - g_eager|| / ||g_eager|| stays under 2e-2 (bf16 operands).  Replays with new
batches keep matching (the static inputs are refreshed), and evaluation mode falls back to eager.
"""

import os
from pathlib import Path

import pytest
from gpu_checks import assert_adapter_loads, assert_trained, bf16_step as _step, onoff  # noqa: F401

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu


def _model(model_dir, seed=0):
    from studio import modeling
    from studio.presets import load_preset

    cfg = load_preset("mistral-7b-finance-fast").replace({
        "model.base_model": str(model_dir), "model.compute_dtype": "bf16", "lora.dropout": 0.0,
        "speed.gradient_checkpointing": "off"})
    tok = modeling.load_tokenizer(cfg)
    base = modeling.load_base(cfg, tok)
    torch.manual_seed(seed)
    model = modeling.add_lora(cfg, base)
    for n, p in model.named_parameters():  # LoRA B starts at zero: give it values so gradients flow everywhere
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model


B, L = 8, 128


def _batch(seed):
    from studio.speed.graphs import StaticRowsCollator

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        n = int(torch.randint(20, L + 1, (1,), generator=g))
        ids = torch.randint(3, 30000, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return {k: v.cuda() for k, v in StaticRowsCollator(B, L, 0)(rows).items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_layers_match_eager_step():
    from bench.common import random_model
    from studio.speed.graphs import graph_layers

    work = Path(os.environ.get("STUDIO_BENCH_WORK", "/tmp/qlora-bench"))
    model_dir = random_model(work / "mistral-7b-width-2-layers", layers=2)
    eager, graphed = _model(model_dir), _model(model_dir)
    assert graph_layers(graphed, B, L, torch.bfloat16) == 2
    worst_loss, worst_grad = 0.0, 0.0
    for seed in (1, 2, 3):
        batch = _batch(seed)
        le, ge = _step(eager, batch)
        lg, gg = _step(graphed, batch)
        assert torch.isfinite(lg)
        worst_loss = max(worst_loss, float((lg - le).abs() / le.abs()))
        for n in ge:
            worst_grad = max(worst_grad, float((gg[n] - ge[n]).norm() / ge[n].norm()))
    assert graphed.get_base_model().graph_replays[0] == 3 * 2  # every step replayed both layers
    print(f"\nGRAPHS vs EAGER: max loss rel diff {worst_loss:.2e}, max LoRA grad rel diff {worst_grad:.2e}")
    assert worst_loss < 1e-3 and worst_grad < 2e-2
    graphed.eval()
    eager.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ids = batch["input_ids"][:, :77]
        torch.testing.assert_close(graphed(input_ids=ids).logits, eager(input_ids=ids).logits, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_preset_with_cuda_graphs_trains_and_saves(tmp_path):


    from bench.common import random_model, synthetic_alpaca
    from studio.presets import load_preset
    from studio.runs import RunStore
    from studio.security import output_dir
    from studio.training import Recipe

    work = Path(os.environ.get("STUDIO_BENCH_WORK", "/tmp/qlora-bench"))
    model_dir = random_model(work / "mistral-7b-width-2-layers", layers=2)
    data = synthetic_alpaca(tmp_path / "fast.jsonl", 300, seed=3)
    cfg = load_preset("mistral-7b-finance-fast").replace({
        "model.base_model": str(model_dir), "data.path": str(data), "data.hub_dataset": "", "data.mapping": {},
        "data.train_samples": 0, "data.val_samples": 20, "train.max_steps": 12, "train.logging_steps": 1,
        "train.eval_steps": 6, "train.save_steps": 6, "train.sample_prompts": 1,
        "speed.cuda_graphs": "on", "output.adapter_dir": "adapter"})
    run = RunStore(tmp_path / "runs").create(cfg)
    assert Recipe(run).execute() == "completed", run.last_status()
    evs = run.all_events()
    assert any(e["type"] == "graphs" for e in evs)
    assert any(e["type"] == "plan" and e["cuda_graphs"] for e in evs)
    assert_trained(evs, 12)
    assert_adapter_loads(model_dir, output_dir("adapter"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_path_matches_reference_path():
    """The whole fast path (compute-dtype frozen weights, 16-bit weight cache, graphed layers) against the
    reference (peft's k-bit preparation, eager): on the same batches
    the loss agrees within 1e-2 relative and each LoRA gradient within 5e-2 relative norm (bf16)."""
    from bench.common import random_model
    from studio import modeling
    from studio.presets import load_preset
    from studio.speed.graphs import graph_layers
    from studio.speed.weight_cache import cache_dequantized

    work = Path(os.environ.get("STUDIO_BENCH_WORK", "/tmp/qlora-bench"))
    model_dir = random_model(work / "mistral-7b-width-2-layers", layers=2)
    ref = _model(model_dir)
    cfg = load_preset("mistral-7b-finance-fast").replace({
        "model.base_model": str(model_dir), "model.compute_dtype": "bf16", "lora.dropout": 0.0,
        "speed.gradient_checkpointing": "off", "speed.fp32_frozen": "off", "speed.weight_cache": "on"})
    base = modeling.load_base(cfg, modeling.load_tokenizer(cfg))
    torch.manual_seed(0)
    fast = modeling.add_lora(cfg, base)
    for n, p in fast.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    assert fast.get_input_embeddings().weight.dtype == torch.bfloat16
    assert cache_dequantized(fast, torch.bfloat16) > 0
    graph_layers(fast, B, L, torch.bfloat16)
    worst_loss, worst_grad = 0.0, 0.0
    for seed in (4, 5):
        batch = _batch(seed)
        lr, gr = _step(ref, batch)
        lf, gf = _step(fast, batch)
        worst_loss = max(worst_loss, float((lf - lr).abs() / lr.abs()))
        for n in gr:
            worst_grad = max(worst_grad, float((gf[n] - gr[n]).norm() / gr[n].norm()))
    print(f"\nFAST PATH vs REFERENCE: max loss rel diff {worst_loss:.2e}, max LoRA grad rel diff {worst_grad:.2e}")
    assert worst_loss < 1e-2 and worst_grad < 5e-2
