"""The CUDA-graphs path's batches (CPU half): fixed-shape rows without a mask learn what padded batches learn.

Graph capture itself needs CUDA (tests/gpu/test_graphs_gpu.py compares graphed and eager steps there);
here the fixed [batch_size, max_length] rows the graphed layers are captured for are checked against
the padded, masked batches of transformers' collator on the tiny model.
"""

import pytest
import torch
from transformers import DataCollatorForSeq2Seq

from studio.speed.graphs import StaticRowsCollator, decoder_layers
from test_padding_free import _model, _rows, assert_same_step


def test_static_rows_shape_and_padding(tiny_tokenizer):
    rows = _rows(tiny_tokenizer, 3)
    b = StaticRowsCollator(4, 128, pad_token_id=tiny_tokenizer.pad_token_id)(rows)
    assert set(b) == {"input_ids", "labels"}  # no attention mask: causal attention never looks ahead
    assert b["input_ids"].shape == b["labels"].shape == (4, 128)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert b["input_ids"][i, :n].tolist() == r["input_ids"] and b["labels"][i, :n].tolist() == r["labels"]
        assert (b["labels"][i, n:] == -100).all() and (b["input_ids"][i, n:] == tiny_tokenizer.pad_token_id).all()
    assert (b["labels"][3] == -100).all()  # a missing row is all padding


def test_static_rows_cut_at_length(tiny_tokenizer):
    rows = _rows(tiny_tokenizer, 2)
    b = StaticRowsCollator(2, 10)(rows)
    assert b["input_ids"][0].tolist() == rows[0]["input_ids"][:10]


def test_static_rows_without_mask_match_padded_masked_batches(tiny_model_dir, tiny_tokenizer):
    """What the graphed layers compute (fixed rows, no mask) equals the padded, masked step."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_model(tiny_model_dir), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                              lora_dropout=0.0, init_lora_weights=False))
    rows = _rows(tiny_tokenizer)
    assert_same_step(model, [DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)(rows),
                             StaticRowsCollator(6, 128, tiny_tokenizer.pad_token_id)(rows)])


def test_layer_inputs_record_dtypes_and_derive_which_inputs_need_gradients(tiny_model_dir):
    """What graph_layers captures each layer for, found without an eager backward (CPU, no capture)."""
    from peft import LoraConfig, get_peft_model

    from studio.speed.graphs import layer_inputs

    model = get_peft_model(_model(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    n = len(decoder_layers(model))
    specs = layer_inputs(model, 2, 16, torch.bfloat16)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert len(specs) == n and all(s[0] == torch.float32 and s[3] == (1, 16, head_dim) for s in specs)
    assert [s[1] for s in specs] == [False] + [True] * (n - 1)  # layer 0's input is the frozen embedding's output
    assert all(p.grad is None for p in model.parameters())  # no backward ran
    model.enable_input_require_grads()
    assert all(s[1] for s in layer_inputs(model, 2, 16, torch.bfloat16))


def test_no_decoder_layers_is_a_clear_error():
    from studio.speed.graphs import UnsupportedModel

    with pytest.raises(UnsupportedModel, match="Llama-style"):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("fp32_frozen", [True, False])
def test_frozen_weights_dtype_follows_fp32_frozen(tiny_model_dir, fp32_frozen):
    """peft's k-bit preparation upcasts embeddings and norms to fp32; fp32_frozen off keeps the compute dtype."""
    from studio import modeling
    from studio.presets import load_preset

    from studio.speed.plan import reference

    cfg = load_preset("tiny-demo").replace({"model.base_model": str(tiny_model_dir), "model.compute_dtype": "bf16"})
    base = modeling.load_base(cfg, modeling.load_tokenizer(cfg))
    model = modeling.add_lora(cfg, base, reference(cfg, "cpu").with_(fp32_frozen=fp32_frozen))
    want = torch.float32 if fp32_frozen else torch.bfloat16
    assert model.get_input_embeddings().weight.dtype == want
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == want for p in norms)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # LoRA stays fp32


def test_weight_cache_is_in_the_estimate():
    from studio.estimate import KNOWN, GiB, estimate
    from studio.presets import load_preset
    from studio.speed.plan import reference

    arch = KNOWN["mistralai/Mistral-7B-v0.1"]
    cfg = load_preset("mistral-7b-finance-fast")
    plain = reference(cfg).with_(gradient_checkpointing=False, cuda_graphs=True, micro_batch=8, grad_accum=1)
    added = estimate(cfg, arch, plain.with_(weight_cache=True)).total - estimate(cfg, arch, plain).total
    assert 12 < added / GiB < 13.5  # 7.0e9 params x 2 bytes, less the two dequantization buffers it replaces
