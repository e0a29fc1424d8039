"""Padding-free batches learn exactly what padded batches learn, and examples never attend across each other."""

import torch
from transformers import AutoModelForCausalLM
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

from conftest import SAMPLES
from studio.data.files import read_records
from studio.data.pipeline import to_examples, tokenize_examples
from studio.data.schema import detect
from studio.data.templates import TemplateSpec


def _rows(tok, n=4):
    recs = read_records(SAMPLES / "finance_alpaca.jsonl")[:n]
    toks = tokenize_examples(to_examples(recs, detect(recs).mapping)[0], TemplateSpec("alpaca"), tok, 128, False)
    return [{"input_ids": t.input_ids, "labels": t.labels} for t in toks]


def _model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False  # as studio.modeling.add_lora sets it for training
    return model


def test_packed_row_equals_separate_rows(tiny_model_dir, tiny_tokenizer):
    model = _model(tiny_model_dir).eval()
    rows = _rows(tiny_tokenizer)
    packed = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        start = 0
        for r in rows:
            n = len(r["input_ids"])
            alone = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            torch.testing.assert_close(out[start:start + n], alone, rtol=1e-4, atol=1e-4)
            start += n


def test_padding_free_loss_and_lora_grads_match_padded(tiny_model_dir, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = _model(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                            init_lora_weights=False))
    rows = _rows(tiny_tokenizer)
    # The collators the training recipe uses (studio.training.Recipe.collator).
    assert_same_step(model, [DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)(rows),
                             DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(rows)])


def assert_same_step(model, batches):
    """Each batch gives the first one's loss (1e-5) and LoRA gradients (1e-4 relative), fp32."""
    results = []
    for batch in batches:
        model.zero_grad()
        n_items = int((batch["labels"][:, 1:] != -100).sum())
        loss = model(**batch, num_items_in_batch=n_items).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    l0, g0 = results[0]
    for l1, g1 in results[1:]:
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)
