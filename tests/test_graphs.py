"""The CUDA-graphs path's batches and mask (CPU half): fixed-shape packing learns what padding-free learns.

Graph capture itself needs CUDA (tests/gpu/test_graphs_gpu.py compares graphed and eager steps there);
here the static packing and the block-diagonal mask the graphed layers attend with are checked against
transformers' own padding-free path on the tiny model.
"""

import pytest
import torch
from transformers import DataCollatorWithFlattening

from studio.graphs import StaticPackCollator, block_causal_mask, decoder_layers, use_block_mask
from test_padding_free import _model, _rows


def test_static_pack_shape_labels_and_positions(tiny_tokenizer):
    rows = _rows(tiny_tokenizer, 3)
    cap = 3 * 128
    b = StaticPackCollator(cap, pad_token_id=tiny_tokenizer.pad_token_id)(rows)
    assert {k: tuple(v.shape) for k, v in b.items()} == {k: (1, cap) for k in ("input_ids", "labels", "position_ids")}
    n = sum(len(r["input_ids"]) for r in rows)
    assert n < cap
    ref = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(rows)
    for k in ("input_ids", "labels", "position_ids"):
        assert b[k][0, :n].tolist() == ref[k][0].tolist()
    assert (b["labels"][0, n:] == -100).all()
    assert b["position_ids"][0, n:].tolist() == list(range(cap - n))  # the padding is a segment of its own
    assert (b["input_ids"][0, n:] == tiny_tokenizer.pad_token_id).all()


def test_static_pack_cuts_at_capacity(tiny_tokenizer):
    rows = _rows(tiny_tokenizer, 4)
    cap = len(rows[0]["input_ids"]) + 5
    b = StaticPackCollator(cap)(rows)
    assert b["input_ids"].shape == (1, cap)
    assert b["position_ids"][0].tolist() == list(range(len(rows[0]["input_ids"]))) + list(range(5))


def test_block_causal_mask_keeps_examples_apart():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    m = block_causal_mask(pos)[0, 0]
    expect = torch.tensor([[1, 0, 0, 0, 0, 0],
                           [1, 1, 0, 0, 0, 0],
                           [1, 1, 1, 0, 0, 0],
                           [0, 0, 0, 1, 0, 0],
                           [0, 0, 0, 1, 1, 0],
                           [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, expect)


def test_static_packed_block_mask_matches_padding_free_loss_and_grads(tiny_model_dir, tiny_tokenizer):
    """What the graphed layers compute (static pack + own mask) equals transformers' padding-free step."""
    from peft import LoraConfig, get_peft_model

    rows = _rows(tiny_tokenizer)
    results = []
    for graphs_path in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(_model(tiny_model_dir), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                  lora_dropout=0.0, init_lora_weights=False))
        if graphs_path:
            use_block_mask(model)
            batch = StaticPackCollator(4 * 128, tiny_tokenizer.pad_token_id)(rows)
        else:
            batch = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(rows)
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)


def test_no_decoder_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="cuda_graphs"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_cuda_graphs_on_cpu_is_refused_by_name():
    from studio.config import ConfigError
    from studio.hardware import detect
    from studio.modeling import preflight
    from studio.presets import load_preset

    cfg = load_preset("tiny-demo").replace({"train.cuda_graphs": True})
    with pytest.raises(ConfigError) as e:
        preflight(cfg, detect(), check_model=False)
    assert e.value.key == "train.cuda_graphs"


@pytest.mark.parametrize("fp32_frozen", [True, False])
def test_frozen_weights_dtype_follows_fp32_frozen(tiny_model_dir, fp32_frozen):
    """peft's k-bit preparation upcasts embeddings and norms to fp32; fp32_frozen off keeps the compute dtype."""
    from studio import modeling
    from studio.presets import load_preset

    cfg = load_preset("tiny-demo").replace({"model.base_model": str(tiny_model_dir), "model.compute_dtype": "bf16",
                                            "model.fp32_frozen": fp32_frozen})
    base = modeling.load_base(cfg, modeling.load_tokenizer(cfg))
    model = modeling.add_lora(cfg, base)
    want = torch.float32 if fp32_frozen else torch.bfloat16
    assert model.get_input_embeddings().weight.dtype == want
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == want for p in norms)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # LoRA stays fp32


def test_weight_cache_is_in_the_estimate_and_the_planner_drops_it_when_short(tmp_path):
    from types import SimpleNamespace

    from studio.estimate import KNOWN, GiB, estimate
    from studio.presets import load_preset
    from studio.runs import RunStore
    from studio.training import Recipe

    arch = KNOWN["mistralai/Mistral-7B-v0.1"]
    cfg = load_preset("mistral-7b-finance-fast").replace({"model.dequantized_cache": True, "train.auto_batch": True,
                                                          "train.cuda_graphs": True})
    added = estimate(cfg, arch).total - estimate(cfg.replace({"model.dequantized_cache": False}), arch).total
    assert 12 < added / GiB < 13.5  # 7.0e9 params x 2 bytes, less the two dequantization buffers it replaces
    plans = {}
    for gib in (80, 16):
        recipe = Recipe(RunStore(tmp_path / str(gib)).create(cfg))
        recipe.hw = SimpleNamespace(device="cuda", total_bytes=gib * GiB)
        recipe._plan_batch()
        plans[gib] = recipe.cfg
    big, small = plans[80], plans[16]
    assert big.model.dequantized_cache and big.train.cuda_graphs and not big.model.gradient_checkpointing
    assert big.train.batch_size * big.train.grad_accum == 8
    assert not small.model.dequantized_cache  # a 16 GB card keeps the memory for activations
    assert small.train.batch_size * small.train.grad_accum == 8
