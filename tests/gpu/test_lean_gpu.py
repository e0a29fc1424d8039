"""GPU tier: the memory-lean fast path (fused 4-bit LoRA with or without dropout, checkpointed layer stack
as one CUDA graph, offloaded checkpoints, up_proj products kept in CPU RAM) learns what the reference path
learns, offloading frees the saved inputs, and a kept up_proj costs at most one output of GPU memory.

Random-weight models of Mistral-7B's width, NF4, bf16, LoRA on all seven projections.  Tolerances (bf16
operands): loss within 1e-2 relative, each LoRA gradient within 5e-2 relative norm
||g_fast - g_ref|| / ||g_ref||, the ones stated in the speed issue's closing notes.
"""

import os
from pathlib import Path

import pytest
from gpu_checks import PLAIN, assert_adapter_loads, assert_trained, bf16_step as _step, onoff

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _work():
    return Path(os.environ.get("STUDIO_BENCH_WORK", "/tmp/qlora-bench"))


def _model(model_dir, **over):
    from studio import modeling
    from studio.presets import load_preset

    cfg = load_preset("mistral-7b-finance-fast").replace({
        "model.base_model": str(model_dir), "model.compute_dtype": "bf16", "lora.dropout": 0.0,
        "lora.target_modules": ALL, "speed.gradient_checkpointing": "off", **over})
    base = modeling.load_base(cfg, modeling.load_tokenizer(cfg))
    torch.manual_seed(0)
    model = modeling.add_lora(cfg, base)
    for n, p in model.named_parameters():  # LoRA B starts at zero: give it values so every gradient flows
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


def _batch(seed, b, n):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 30000, (b, n), generator=g).cuda()
    return {"input_ids": ids, "labels": ids}


def _worst(a, b):
    (l0, g0), (l1, g1) = a, b
    assert g0.keys() == g1.keys()
    return float((l1 - l0).abs() / l0.abs()), max(float((g1[k] - g0[k]).norm() / g0[k].norm()) for k in g0)


def _measured(model, batch):
    """One step after a synchronize: (its loss and gradients, its peak allocated bytes above what was allocated)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = _step(model, batch)
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("offload", [False, True])
def test_lean_graphed_stack_with_fused_lora_matches_reference(offload):
    from bench.common import random_model
    from studio.speed.fused_lora import fuse_lora
    from studio.speed.graphs import graph_layers

    model_dir = random_model(_work() / "mistral-7b-width-2-layers", layers=2)
    ref = _model(model_dir)  # peft's k-bit preparation and LoRA forward, eager, no checkpointing
    lean = _model(model_dir, **{"speed.gradient_checkpointing": "on", "speed.fp32_frozen": "off",
                                "model.double_quant": False})
    assert fuse_lora(lean) == 2 * 7
    assert graph_layers(lean, 4, 128, torch.bfloat16, offload=offload) == 2
    worst = (0.0, 0.0)
    for seed in (1, 2, 3):
        batch = _batch(seed, 4, 128)
        worst = tuple(map(max, worst, _worst(_step(ref, batch), _step(lean, batch))))
    assert lean.get_base_model().graph_replays[0] == 3  # one replay of the whole stack per step
    print(f"\nLEAN (graphed ckpt stack, offload {offload}, fused LoRA) vs REFERENCE: loss {worst[0]:.2e}, LoRA grads {worst[1]:.2e}")
    assert worst[0] < 1e-2 and worst[1] < 5e-2
    lean.eval()  # evaluation runs the layers eagerly, one by one
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(lean(input_ids=batch["input_ids"][:, :50]).logits).all()


def test_offloaded_checkpoints_match_and_free_the_saved_inputs():
    from bench.common import random_model
    from studio.speed.fused_lora import fuse_lora
    from studio.speed.offload import _stack, use_offloaded_checkpoints

    layers, b, n = 8, 4, 2048
    model_dir = random_model(_work() / "mistral-7b-width-8-layers", layers=layers)
    model = _model(model_dir, **{"speed.gradient_checkpointing": "on", "speed.fp32_frozen": "off"})
    fuse_lora(model)
    batch = _batch(7, b, n)
    _step(model, batch)  # warm-up: allocator, cuBLAS workspaces

    plain, plain_peak = _measured(model, batch)
    assert use_offloaded_checkpoints(model) == layers
    _step(model, batch)
    offloaded, off_peak = _measured(model, batch)
    loss_diff, grad_diff = _worst(plain, offloaded)
    saved = plain_peak - off_peak
    layer_input = b * n * 4096 * 2
    print(f"\nOFFLOAD vs torch checkpoint: loss {loss_diff:.2e}, grads {grad_diff:.2e}, peak "
          f"{plain_peak / 2**20:.0f} -> {off_peak / 2**20:.0f} MiB")
    # The same kernels on the same values, up to the flash-attention backward's nondeterministic accumulation
    # (measured 1.4e-3 on an H100).
    assert loss_diff < 1e-5 and grad_diff < 1e-2
    assert saved > (layers - 3) * layer_input  # all but the layer in use and the one prefetched
    assert not [r for r in _stack if r() is not None]


@pytest.mark.parametrize("targets", ["all", "qkvo"])
def test_kept_up_proj_outputs_match_and_cost_at_most_one_output(targets):
    from bench.common import random_model
    from studio.speed import offload
    from studio.speed.fused_lora import fuse_lora

    layers, b, n = 8, 4, 2048
    model_dir = random_model(_work() / "mistral-7b-width-8-layers", layers=layers)
    model = _model(model_dir, **{"speed.gradient_checkpointing": "on", "speed.fp32_frozen": "off",
                                 "lora.target_modules": ALL if targets == "all" else ALL[:4]})
    fuse_lora(model)
    offload.use_offloaded_checkpoints(model)
    batch = _batch(7, b, n)
    _step(model, batch)
    plain, plain_peak = _measured(model, batch)
    assert offload.keep_up_proj(model) == layers
    _step(model, batch)
    before = offload.replayed[0]
    kept, kept_peak = _measured(model, batch)
    assert offload.replayed[0] - before == layers
    loss_diff, grad_diff = _worst(plain, kept)
    one_output = b * n * 14336 * 2
    print(f"\nKEPT up_proj ({targets}) vs recomputed: loss {loss_diff:.2e}, grads {grad_diff:.2e}, peak "
          f"{plain_peak / 2**20:.0f} -> {kept_peak / 2**20:.0f} MiB (one output {one_output / 2**20:.0f} MiB)")
    # The kept product is the forward's own matmul of the same input: the recompute's, bit for bit.
    assert loss_diff < 1e-5 and grad_diff < 1e-2
    assert kept_peak - plain_peak <= 1.1 * one_output  # one output fetched ahead at most
    assert not [r for r in offload._stack if r() is not None]


@pytest.mark.parametrize("offload", [False, True])
def test_fused_lora_with_dropout_draws_peft_masks_on_gpu(offload):
    from bench.common import random_model
    from studio.speed.fused_lora import fuse_lora
    from studio.speed.offload import use_offloaded_checkpoints

    model_dir = random_model(_work() / "mistral-7b-width-2-layers", layers=2)
    over = {"lora.dropout": 0.1, "speed.gradient_checkpointing": onoff(offload), "speed.fp32_frozen": "off"}
    ref, fused = _model(model_dir, **over), _model(model_dir, **over)
    assert fuse_lora(fused) == 2 * 7
    if offload:  # the recompute restores the forward's CUDA RNG state, so it redraws the same masks
        assert use_offloaded_checkpoints(fused) == 2
    worst = (0.0, 0.0)
    for seed in (1, 2):
        batch = _batch(seed, 4, 256)
        torch.manual_seed(seed)
        a = _step(ref, batch)
        torch.manual_seed(seed)
        worst = tuple(map(max, worst, _worst(a, _step(fused, batch))))
    torch.manual_seed(9)
    other = _worst(a, _step(fused, batch))[1]  # other masks: far off, so the masks above really matched
    print(f"\nFUSED LoRA dropout 0.1 (offload {offload}) vs peft: loss {worst[0]:.2e}, LoRA grads {worst[1]:.2e}; "
          f"other seed {other:.2e}")
    assert worst[0] < 1e-2 and worst[1] < 5e-2 and other > 2 * worst[1]


@pytest.mark.parametrize("mode", ["offload", "offload-up", "graphs", "graphs-offload", "graphs-dropout"])
def test_engine_runs_the_lean_path_and_saves_a_loadable_adapter(tmp_path, mode):

    from bench.common import random_model, synthetic_alpaca
    from studio.presets import load_preset
    from studio.runs import RunStore
    from studio.security import output_dir
    from studio.training import Recipe

    model_dir = random_model(_work() / "mistral-7b-width-2-layers", layers=2)
    data = synthetic_alpaca(tmp_path / "fast.jsonl", 200, seed=3)
    cfg = load_preset("mistral-7b-finance-fast").replace({**PLAIN,
        "model.base_model": str(model_dir), "data.path": str(data), "data.hub_dataset": "", "data.mapping": {}, "data.train_samples": 0,
        "data.val_samples": 16, "train.max_steps": 8, "train.logging_steps": 1, "train.eval_steps": 4,
        "train.save_steps": 4, "train.sample_prompts": 1, "lora.target_modules": ALL,
        # graphs-dropout: the graphed stack without checkpointing, replaying the fused layers' dropout draws
        "lora.dropout": 0.05 if "dropout" in mode else 0.0, "speed.gradient_checkpointing": onoff("dropout" not in mode), "speed.fp32_frozen": "off", "model.double_quant": True,
        "speed.fused_lora": "on", "speed.offload_checkpoints": onoff("offload" in mode), "speed.cuda_graphs": onoff("graphs" in mode),
        "speed.offload_up_proj": onoff(mode == "offload-up"),
        "output.adapter_dir": "adapter"})
    run = RunStore(tmp_path / "runs").create(cfg)
    assert Recipe(run).execute() == "completed", run.last_status()
    evs = run.all_events()
    assert next(e for e in evs if e["type"] == "fused_lora")["layers"] == 14
    if mode.startswith("offload"):
        kept = next(e for e in evs if e["type"] == "checkpoint_offload")
        assert kept["layers"] == 2 and kept.get("up_proj", 0) == (2 if mode == "offload-up" else 0)
    else:
        graphs = next(e for e in evs if e["type"] == "graphs")
        assert graphs["checkpointed"] == ("dropout" not in mode) and graphs["offload"] == ("offload" in mode)
    assert_trained(evs, 8)
    assert_adapter_loads(model_dir, output_dir("adapter"))


def test_shared_dequant_buffer_in_the_graphed_stack_matches_and_shrinks_its_pool():
    """Fused LoRA on q,v (the fast shape: five frozen projections a layer) in the offloaded, graphed checkpointed
    stack: with every weight dequantized into the shared buffer the steps learn what the reference learns, and the
    graph's private memory pool (no expandable segments there) holds no weight-sized temporaries."""
    from bench.common import random_model
    from studio.speed.fused_lora import fuse_lora, share_dequant_buffer
    from studio.speed.graphs import graph_layers

    model_dir = random_model(_work() / "mistral-7b-width-2-layers", layers=2)
    qv = {"lora.target_modules": ["q_proj", "v_proj"]}
    ref = _model(model_dir, **qv)
    pools, models = {}, {}
    for shared in (False, True):
        lean = _model(model_dir, **qv, **{"speed.gradient_checkpointing": "on", "speed.fp32_frozen": "off",
                                          "model.double_quant": False})
        assert fuse_lora(lean) == 2 * 2
        added = share_dequant_buffer(lean, torch.bfloat16) if shared else 0
        assert added == (4096 * 14336 * 2 if shared else 0)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved()
        assert graph_layers(lean, 4, 128, torch.bfloat16, offload=True) == 2
        pools[shared] = torch.cuda.memory_reserved() - before - added
        models[shared] = lean
    worst = (0.0, 0.0)
    for seed in (1, 2, 3):
        batch = _batch(seed, 4, 128)
        truth = _step(ref, batch)
        worst = tuple(map(max, worst, _worst(truth, _step(models[True], batch))))
    print(f"\nSHARED dequant buffer, graphed offloaded stack vs REFERENCE: loss {worst[0]:.2e}, LoRA grads "
          f"{worst[1]:.2e}; capture reserved {pools[False] / 2**20:.0f} -> {pools[True] / 2**20:.0f} MiB")
    assert models[True].get_base_model().graph_replays[0] == 3
    assert worst[0] < 1e-2 and worst[1] < 5e-2
    assert pools[True] < pools[False]


def test_paged_8bit_optimizer_steps_without_syncs_and_updates_the_same(monkeypatch):
    import bitsandbytes as bnb

    from studio.trainer import without_param_syncs

    torch.manual_seed(0)
    shapes = [(32, 4096), (4096, 32), (8, 4096)]  # paged state (at least 1e5 elements) and not
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    initial = [p.detach().clone() for p in params]
    ours, theirs = bnb.optim.PagedAdamW8bit(params, lr=1e-3), bnb.optim.PagedAdamW8bit(twins, lr=1e-3)
    assert without_param_syncs(ours)
    syncs, real = [0], torch.cuda.synchronize

    def counted(*a, **k):
        syncs[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(torch.cuda, "synchronize", counted)
    for step in range(4):
        for p, t in zip(params, twins):
            p.grad = torch.randn_like(p)
            t.grad = p.grad.clone()
        start = syncs[0]
        ours.step()
        mine, start = syncs[0] - start, syncs[0]
        theirs.step()
        # The first step allocates the paged states, zero-filled with a sync each (bitsandbytes' own, kept).
        assert (step == 0 or mine == 0) and syncs[0] - start >= len(shapes)
    real()
    assert all(torch.equal(a, b) for a, b in zip(params, twins))
    assert not any(torch.equal(a, b) for a, b in zip(params, initial))  # the steps did update


def test_one_8bit_update_for_all_lora_tensors_is_bitsandbytes_per_tensor_update(monkeypatch):
    """studio.speed.flat_optimizer on the GPU, paged state and skipped syncs as the fast preset runs it: the
    parameters after 4 steps and the 8-bit state are bitsandbytes' own bit for bit, with one update kernel a step,
    and the checkpoint it writes resumes a plain optimizer."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from studio.speed.flat_optimizer import flatten
    from studio.trainer import without_param_syncs

    torch.manual_seed(0)
    shapes = [(8, 4096), (4096, 8), (8, 4096), (1024, 8)] * 4  # r=8 on q and v of Mistral-7B, four layers
    params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, theirs = bnb.optim.PagedAdamW8bit(params, lr=2e-4), bnb.optim.PagedAdamW8bit(twins, lr=2e-4)
    assert flatten(ours) == len(shapes)
    assert without_param_syncs(ours) and without_param_syncs(theirs)
    calls, real = [0], F.optimizer_update_8bit_blockwise

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(F, "optimizer_update_8bit_blockwise", counted)
    for _ in range(4):
        for p, t in zip(params, twins):
            p.grad = torch.randn_like(p) * 1e-3
            t.grad = p.grad.clone()
        before = calls[0]
        ours.step()
        assert calls[0] - before == 1
        theirs.step()
        assert calls[0] - before == 1 + len(shapes)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(params, twins))
    for p, t in zip(params, twins):
        assert all(torch.equal(ours.state[p][k], theirs.state[t][k]) for k in ("state1", "state2", "absmax1"))
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = bnb.optim.PagedAdamW8bit(fresh, lr=2e-4)
    plain.load_state_dict(ours.state_dict())
    for p, f in zip(params, fresh):
        p.grad = torch.randn_like(p) * 1e-3
        f.grad = p.grad.clone()
    ours.step()
    plain.step()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(params, fresh))
