"""The memory-lean speed options change nothing learned: fused 4-bit LoRA layers and offloaded checkpointing
give peft's / torch's loss and LoRA gradients on a real NF4 model (bitsandbytes on the CPU)."""

import pytest
import torch
from transformers import DataCollatorForSeq2Seq

from studio.config import ConfigError
from test_padding_free import _rows


def _lora_model(tiny_model_dir, **over):
    from studio import modeling
    from studio.presets import load_preset

    cfg = load_preset("tiny-demo").replace({"model.base_model": str(tiny_model_dir), **over})
    model = modeling.add_lora(cfg, modeling.load_base(cfg, modeling.load_tokenizer(cfg)))
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero, which would leave A without a gradient to compare
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def _step(model, batch, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for both paths
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b, rtol):
    (l0, g0), (l1, g1) = a, b
    torch.testing.assert_close(l1, l0, rtol=rtol, atol=1e-6)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=rtol, atol=1e-6, msg=n)


def test_fused_lora_matches_peft_loss_and_gradients(tiny_model_dir, tiny_tokenizer):
    from peft.tuners.lora.bnb import Linear4bit

    from studio.speed.fused_lora import fuse_lora

    model = _lora_model(tiny_model_dir)
    batch = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)(_rows(tiny_tokenizer))
    reference = _step(model, batch)
    n = fuse_lora(model)
    assert n == sum(isinstance(m, Linear4bit) for m in model.modules()) == 7 * model.config.num_hidden_layers
    assert fuse_lora(model) == 0  # patching twice changes nothing
    fused = _step(model, batch)
    _assert_same(reference, fused, rtol=1e-4)
    assert any(g.abs().sum() > 0 for k, g in fused[1].items() if "lora_A" in k)
    # Evaluation and adapters switched off take peft's own forward.
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).loss, reference[0], rtol=1e-4, atol=1e-6)
        with model.disable_adapter():
            assert not torch.allclose(model(**batch).loss, reference[0])


def test_fused_lora_under_bf16_autocast_matches_peft(tiny_model_dir, tiny_tokenizer):
    from studio.speed.fused_lora import fuse_lora

    model = _lora_model(tiny_model_dir)
    batch = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)(_rows(tiny_tokenizer))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = _step(model, batch)
        fuse_lora(model)
        fused = _step(model, batch)
    # bf16 rounding: the fused path adds the LoRA product inside the fp32-accumulated matmul.
    torch.testing.assert_close(fused[0], reference[0], rtol=2e-2, atol=1e-3)
    for k in reference[1]:
        rel = (fused[1][k] - reference[1][k]).norm() / reference[1][k].norm()
        assert rel < 5e-2, (k, float(rel))
    assert all(g.dtype == torch.float32 for g in fused[1].values())  # fp32 LoRA weights, fp32 gradients


def _worst(a, truth):
    return max(float((a[1][k] - truth[1][k]).norm() / truth[1][k].norm()) for k in truth[1])


def test_fused_lora_with_dropout_draws_peft_masks(tiny_model_dir, tiny_tokenizer):
    from studio.speed.fused_lora import fuse_lora

    model = _lora_model(tiny_model_dir, **{"lora.dropout": 0.3})
    batch = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)(_rows(tiny_tokenizer))
    reference = _step(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_bf16 = _step(model, batch)
    assert fuse_lora(model) == 7 * model.config.num_hidden_layers
    fused = _step(model, batch)
    # Same seed, same masks: peft's numbers.  Another seed draws other masks, so other gradients.
    _assert_same(reference, fused, rtol=1e-4)
    assert _worst(_step(model, batch, seed=1), fused) > 0.1
    # Under bf16 autocast both paths round; the fused one is as close to the fp32 numbers as peft's own
    # (measured: peft 4.1e-2, fused 2.1e-2 worst relative gradient error on this model).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_bf16 = _step(model, batch)
    torch.testing.assert_close(fused_bf16[0], reference[0], rtol=2e-2, atol=1e-3)
    assert _worst(fused_bf16, reference) < max(5e-2, 1.25 * _worst(peft_bf16, reference))


@pytest.mark.parametrize("dropout,fused", [(0.0, False), (0.1, False), (0.0, True), (0.1, True)])
def test_offloaded_checkpoints_match_torch_checkpointing(tiny_model_dir, tiny_tokenizer, dropout, fused):
    from studio.speed import offload
    from studio.speed.fused_lora import fuse_lora

    model = _lora_model(tiny_model_dir, **{"speed.gradient_checkpointing": "on", "lora.dropout": dropout})
    if fused:
        assert fuse_lora(model) > 0
    batch = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)(_rows(tiny_tokenizer))
    reference = _step(model, batch)  # torch's reentrant checkpoint (preserves the RNG state for dropout)
    layers = model.config.num_hidden_layers
    assert offload.use_offloaded_checkpoints(model) == layers
    before = offload.skipped[0]
    ours = _step(model, batch)
    # The recompute sees the forward's dropout masks (a redrawn mask would change the grads), and skipping
    # down_proj's matmul in the recompute changes nothing: its output is never read by the backward.
    _assert_same(reference, ours, rtol=1e-5)
    assert offload.skipped[0] - before == layers  # one skipped matmul per layer's recompute, none elsewhere
    assert not [r for r in offload._stack if r() is not None]  # every saved input was consumed by its backward
    if dropout == 0:
        model.eval()
        with torch.no_grad():  # outside a recompute down_proj computes as ever
            torch.testing.assert_close(model(**batch).loss, reference[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dropout,fused", [(0.0, False), (0.1, False), (0.0, True), (0.1, True)])
def test_kept_up_proj_outputs_replace_their_recompute(tiny_model_dir, tiny_tokenizer, dropout, fused):
    from studio.speed import offload
    from studio.speed.fused_lora import fuse_lora

    model = _lora_model(tiny_model_dir, **{"speed.gradient_checkpointing": "on", "lora.dropout": dropout})
    if fused:
        fuse_lora(model)
    batch = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)(_rows(tiny_tokenizer))
    reference = _step(model, batch)
    layers = model.config.num_hidden_layers
    offload.use_offloaded_checkpoints(model)
    assert offload.keep_up_proj(model) == layers and offload.keep_up_proj(model) == 0
    before = offload.replayed[0]
    ours = _step(model, batch)
    # up_proj (with LoRA on it, as here) gives the kept base product plus its recomputed LoRA term: the
    # recompute reads the forward's values, so loss and every LoRA gradient (up_proj's included) are unchanged.
    _assert_same(reference, ours, rtol=1e-5)
    assert offload.replayed[0] - before == layers  # one matmul taken from host memory per layer's recompute
    assert not [r for r in offload._stack if r() is not None]
    with torch.no_grad():  # outside checkpointed layers nothing is kept or replayed
        model(**batch)
    assert offload.replayed[0] - before == layers
    _assert_same(reference, _step(model, batch), rtol=1e-5)


@pytest.mark.parametrize("fp32_frozen", [False, True])
def test_kept_up_proj_under_bf16_autocast(tiny_model_dir, tiny_tokenizer, fp32_frozen):
    """As training runs on a GPU: bf16 autocast, fused LoRA with dropout, and with peft's fp32 residual stream
    (fp32_frozen) the kept product comes back in the layer's compute dtype and is cast as bitsandbytes casts."""
    from studio.speed import offload
    from studio.speed.fused_lora import fuse_lora

    model = _lora_model(tiny_model_dir, **{"speed.gradient_checkpointing": "on", "lora.dropout": 0.1,
                                           "speed.fp32_frozen": "on" if fp32_frozen else "off"})
    fuse_lora(model)
    batch = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)(_rows(tiny_tokenizer))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = _step(model, batch)
        offload.use_offloaded_checkpoints(model)
        offload.keep_up_proj(model)
        before = offload.replayed[0]
        ours = _step(model, batch)
    assert offload.replayed[0] - before == model.config.num_hidden_layers
    # The recompute's bf16 matmul vs the forward's product rounded to bf16 (measured 5e-3 and 8e-3).
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-3, atol=1e-4)
    assert _worst(ours, reference) < 2e-2


def test_kept_up_proj_without_lora_on_it(tiny_model_dir, tiny_tokenizer):
    from studio.speed import offload

    # The thorough preset's targets: q, k, v, o; up_proj is a plain frozen 4-bit layer.
    model = _lora_model(tiny_model_dir, **{"speed.gradient_checkpointing": "on", "lora.dropout": 0.0,
                                           "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    batch = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)(_rows(tiny_tokenizer))
    reference = _step(model, batch)
    offload.use_offloaded_checkpoints(model)
    offload.keep_up_proj(model)
    before = offload.replayed[0], offload.skipped[0]
    _assert_same(reference, _step(model, batch), rtol=1e-5)
    layers = model.config.num_hidden_layers
    assert (offload.replayed[0] - before[0], offload.skipped[0] - before[1]) == (layers, layers)


def test_unknown_decoder_layers_keep_their_last_matmul(tiny_model_dir):
    from studio.speed import offload

    model = _lora_model(tiny_model_dir, **{"speed.gradient_checkpointing": "on"})
    assert offload.skip_unused_output(model) == model.config.num_hidden_layers
    assert offload.skip_unused_output(model) == 0  # once only
    other = _lora_model(tiny_model_dir, **{"speed.gradient_checkpointing": "on"})
    for layer in other.get_base_model().model.layers:
        layer.__class__ = type("GemmaLikeDecoderLayer", (type(layer),), {})  # e.g. a norm after the MLP
    assert offload.skip_unused_output(other) == 0


def test_offloaded_checkpoints_forget_a_forward_without_backward(tiny_model_dir, tiny_tokenizer):
    from studio.speed import offload

    model = _lora_model(tiny_model_dir, **{"speed.gradient_checkpointing": "on"})
    offload.use_offloaded_checkpoints(model)
    batch = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)(_rows(tiny_tokenizer))
    model(**batch)  # e.g. a step that failed before its backward: its graph and saved inputs are dropped
    first = _step(model, batch)
    assert not [r for r in offload._stack if r() is not None]
    with torch.no_grad():  # no autograd: the layer just runs
        model(**batch)
    assert not [r for r in offload._stack if r() is not None]
    _assert_same(first, _step(model, batch), rtol=1e-6)


def test_offloading_lowers_the_estimate_by_the_saved_layer_inputs():
    from studio.estimate import KNOWN, GiB, estimate
    from studio.presets import load_preset

    from studio.speed.plan import reference

    arch = KNOWN["mistralai/Mistral-7B-Instruct-v0.3"]
    cfg = load_preset("mistral-7b-instruct-thorough").replace({"train.batch_size": 4})
    plain = reference(cfg)
    saved = estimate(cfg, arch, plain).total - estimate(cfg, arch, plain.with_(offload_checkpoints=True)).total
    assert saved / GiB == pytest.approx((32 - 2) * 4 * 4096 * 4096 * 2 / GiB)


def test_kept_up_proj_adds_one_fetched_output_to_the_estimate():
    from studio.estimate import KNOWN, estimate
    from studio.presets import load_preset

    from studio.speed.plan import reference

    arch = KNOWN["mistralai/Mistral-7B-Instruct-v0.3"]
    cfg = load_preset("mistral-7b-instruct-thorough")
    off = reference(cfg).with_(offload_checkpoints=True)
    more = estimate(cfg, arch, off.with_(offload_up_proj=True)).total - estimate(cfg, arch, off).total
    assert more == 4 * 4096 * 14336 * 2


def test_engine_keeps_up_proj_in_cpu_ram_and_learns(tmp_path):
    """A real run of the tiny model with every lean switch a CPU takes: fused LoRA with dropout, offloaded
    checkpoints, up_proj kept in host memory."""
    from studio.speed import offload
    from studio.presets import load_preset
    from studio.runs import RunStore
    from studio.training import Recipe

    cfg = load_preset("tiny-demo").replace({
        "train.max_steps": 6, "train.logging_steps": 1, "train.eval_steps": 3, "train.save_steps": 0,
        "speed.gradient_checkpointing": "on", "speed.offload_checkpoints": "on", "speed.offload_up_proj": "on",
        "speed.fused_lora": "on", "lora.dropout": 0.1})
    run = RunStore(tmp_path / "runs").create(cfg)
    before = offload.replayed[0]
    assert Recipe(run).execute() == "completed", run.last_status()
    evs = run.all_events()
    layers = next(e for e in evs if e["type"] == "checkpoint_offload")
    assert layers["up_proj"] == layers["layers"] > 0 and "host_gib" in layers
    metrics = [e["loss"] for e in evs if e["type"] == "metric"]
    assert len(metrics) == 6 and metrics[-1] < metrics[0]
    # every training micro-batch's recompute took its up_proj products from host memory
    assert offload.replayed[0] - before >= 6 * layers["layers"]


def test_lean_thorough_switches_on_padding_free_rows_match_plain_checkpointing(tiny_model_dir, tiny_tokenizer):
    """The lean thorough preset's combination: one flattened row per micro-batch through offloaded checkpoints with
    kept up_proj products and fused LoRA with dropout gives plain checkpointing's loss and LoRA gradients."""
    from transformers import DataCollatorWithFlattening

    from studio.speed import offload
    from studio.speed.fused_lora import fuse_lora

    model = _lora_model(tiny_model_dir, **{"speed.gradient_checkpointing": "on", "lora.dropout": 0.05,
                                           "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    batch = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(_rows(tiny_tokenizer))
    assert batch["input_ids"].shape[0] == 1
    reference = _step(model, batch)
    fuse_lora(model)
    layers = offload.use_offloaded_checkpoints(model)
    assert offload.keep_up_proj(model) == layers
    before = offload.replayed[0]
    _assert_same(reference, _step(model, batch), rtol=1e-5)
    assert offload.replayed[0] - before == layers


def test_lean_thorough_switches_train_on_the_cpu(tmp_path, tiny_model_dir):
    """The thorough preset with the long-row parts a CPU can run pinned on (Liger, graphs and the paged 8-bit
    optimizer are CUDA-only): every pinned part engages."""
    from studio.presets import load_preset
    from studio.runs import RunStore
    from studio.training import Recipe

    demo = load_preset("tiny-demo")
    cfg = load_preset("mistral-7b-instruct-thorough").replace({
        "model.base_model": str(tiny_model_dir), "model.compute_dtype": "fp32", "train.optimizer": "adamw_torch",
        "speed.gradient_checkpointing": "on", "speed.offload_checkpoints": "on", "speed.offload_up_proj": "on",
        "speed.fused_lora": "on", "speed.padding_free": "on", "speed.fp32_frozen": "off",
        "data.path": demo.data.path, "data.template": demo.data.template, "data.max_length": 256,
        "train.max_steps": 3, "train.logging_steps": 1, "train.eval_steps": 0, "train.save_steps": 0,
        "train.tensorboard": False, "train.sample_prompts": 0})
    run = RunStore(tmp_path / "runs").create(cfg)
    assert Recipe(run).execute() == "completed", run.last_status()
    evs = run.all_events()
    offloaded = next(e for e in evs if e["type"] == "checkpoint_offload")
    assert offloaded["up_proj"] == offloaded["layers"] > 0
    assert next(e for e in evs if e["type"] == "fused_lora")["layers"] > 0
    assert len([e for e in evs if e["type"] == "metric"]) == 3


def test_up_proj_stays_on_the_gpu_path_when_cpu_ram_is_short(tiny_model_dir):
    from studio.speed.offload import keep_up_proj_if_room

    model = _lora_model(tiny_model_dir, **{"speed.gradient_checkpointing": "on"})
    cfg = model.config
    tokens = 4 * 100
    # Pinned blocks are powers of two: fp32 layer inputs and bf16 products, each rounded up; two ranks.
    per_layer = 2 ** (tokens * cfg.hidden_size * 4 - 1).bit_length() + 2 ** (tokens * cfg.intermediate_size * 2 - 1).bit_length()
    need = cfg.num_hidden_layers * per_layer * 2
    done = keep_up_proj_if_room(model, tokens, 2, free=2 * need - 1, residual_bytes=4, ranks=2)  # half of RAM stays free
    assert done["up_proj"] == 0 and "GiB of CPU RAM" in done["up_proj_note"]
    assert not any(getattr(m, "_keep_output", False) for m in model.modules())
    done = keep_up_proj_if_room(model, tokens, 2, free=2 * need, residual_bytes=4, ranks=2)
    assert done["up_proj"] == cfg.num_hidden_layers and done["host_gib"] == round(need / 2**30, 2)


@pytest.mark.parametrize("fused", [False, True])
def test_shared_dequant_buffer_changes_nothing_learned(tiny_model_dir, tiny_tokenizer, monkeypatch, fused):
    """Every 4-bit weight dequantized into one shared buffer (fused LoRA layers and frozen ones alike), under
    offloaded checkpoints with kept up_proj products and dropout: bitsandbytes' loss and LoRA gradients, and its
    own matmul is no longer called on more than one token."""
    import bitsandbytes as bnb

    from studio.speed import offload
    from studio.speed.fused_lora import fuse_lora, share_dequant_buffer

    model = _lora_model(tiny_model_dir, **{"speed.gradient_checkpointing": "on", "lora.dropout": 0.1,
                                           "lora.target_modules": ["q_proj", "v_proj"]})
    batch = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)(_rows(tiny_tokenizer))
    reference = _step(model, batch)
    if fused:
        fuse_lora(model)
    bases = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    dtype = bases[0].weight.quant_state.dtype
    largest = max(m.weight.quant_state.shape.numel() for m in bases)
    assert share_dequant_buffer(model, dtype) == largest * dtype.itemsize
    assert len({id(m._dequant_scratch) for m in bases}) == 1  # one buffer for the device
    assert share_dequant_buffer(model, dtype) == largest * dtype.itemsize  # again: a new buffer, not a new wrapper
    assert len({id(m._dequant_scratch) for m in bases}) == 1
    offload.use_offloaded_checkpoints(model)
    offload.keep_up_proj(model)
    calls = []
    matmul_4bit = bnb.matmul_4bit
    monkeypatch.setattr(bnb, "matmul_4bit", lambda *a, **k: calls.append(a[0].shape) or matmul_4bit(*a, **k))
    ours = _step(model, batch)
    _assert_same(reference, ours, rtol=1e-5)
    assert calls == []
    model.eval()
    with torch.no_grad():  # evaluation: the shared buffer on whole rows, bitsandbytes' own path on one token
        assert torch.isfinite(model(**batch).loss) and calls == []
        model(input_ids=batch["input_ids"][:1, :1])
    assert len(calls) == len(bases)


def test_shared_dequant_buffer_skips_other_dtypes_and_cached_weights(tiny_model_dir):
    import bitsandbytes as bnb

    from studio.speed.fused_lora import share_dequant_buffer

    model = _lora_model(tiny_model_dir)
    bases = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    other = torch.float16 if bases[0].weight.quant_state.dtype != torch.float16 else torch.bfloat16
    assert share_dequant_buffer(model, other) == 0  # weights that dequantize to another dtype keep their own path
    assert not any(hasattr(m, "_dequant_scratch") for m in bases)
