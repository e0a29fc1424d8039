"""bitsandbytes runs a 4-bit layer on the CPU in one of two ways, chosen by the CPU: dequantize-and-matmul in
the compute dtype (every CPU, and always while training), or, on CPUs with AVX-512 BF16 and only in eval mode
without gradients, an inference kernel that repacks the weight in place (absmax rounded to bf16) and multiplies
in bf16.  The studio keeps its models on the first path everywhere, so the model a user evaluates and chats
with is the one that was trained.

Each test runs for both kinds of CPU by forcing bitsandbytes' CPU detection, whatever CPU CI lands on.  The
bf16 kernel itself is never called (it would fault on a CPU without the instructions): what is proved is that
the studio's models never take it, while a plain load under the same detection would.
"""

import pytest
import torch

from studio import modeling
from studio.presets import load_preset

PROMPTS = ["### Instruction:\nCompute ROI.\n\n### Response:\nThe ROI is", "Hello world"]


@pytest.fixture(params=[False, True], ids=["cpu-without-avx512bf16", "cpu-with-avx512bf16"])
def avx512bf16(request, monkeypatch):
    """What bitsandbytes believes about the CPU when a layer is built (it asks once, in Linear4bit.__init__)."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: request.param)
    return request.param


def _quant_state(model):
    """Every 4-bit weight's packed bytes and quantization statistics, as plain tensors."""
    import bitsandbytes as bnb

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            out[name] = (m.weight.data.clone(), qs.absmax.clone(), qs.dtype, getattr(qs, "nested", None),
                         bool(getattr(qs, "packing_format_for_cpu", False)))
    return out


def _assert_same_state(a, b):
    assert a.keys() == b.keys() and a
    for k in a:
        (w0, m0, d0, n0, p0), (w1, m1, d1, n1, p1) = a[k], b[k]
        assert not p0 and not p1, f"{k} was repacked for bitsandbytes' CPU inference kernel"
        assert torch.equal(w0, w1) and torch.equal(m0, m1) and (d0, n0) == (d1, n1), k


def test_plain_load_follows_the_forced_cpu_detection(tiny_model_dir, avx512bf16):
    """The control: without the studio, bitsandbytes' layers take whatever path the detection says."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    raw = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), quantization_config=q, device_map="cpu",
                                               dtype=torch.float32)
    flags = {m.support_avx512bf16_for_cpu for m in raw.modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert flags == {avx512bf16}


def test_studio_model_evaluates_what_it_trains_on_either_cpu(tiny_model_dir, tiny_tokenizer, avx512bf16):
    cfg = load_preset("tiny-demo").replace({"model.base_model": str(tiny_model_dir)})
    model = modeling.load_base(cfg, modeling.load_tokenizer(cfg))
    before = _quant_state(model)
    enc = tiny_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    model.train()  # the training path: bitsandbytes dequantizes and multiplies in fp32
    with torch.no_grad():
        trained_path = model(**enc).logits
    model.eval()  # inference: on an AVX-512 BF16 CPU bitsandbytes alone would repack here
    with torch.no_grad():
        first = model(**enc).logits
        second = model(**enc).logits
    _assert_same_state(before, _quant_state(model))
    torch.testing.assert_close(first, trained_path, rtol=0, atol=1e-5)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_tuned_model_in_playground_equals_the_trained_model_on_either_cpu(avx512bf16):
    """A short run that evaluates mid-training (the first eval-mode call), then the Playground's loader."""
    from studio.runs import RunStore
    from studio.training import Recipe

    cfg = load_preset("tiny-demo").replace({
        "train.max_steps": 4, "train.eval_steps": 2, "train.save_steps": 0, "train.logging_steps": 1,
        "train.sample_prompts": 1, "data.val_samples": 8})
    run = RunStore().create(cfg)
    r = Recipe(run)
    r.setup()
    r.train()
    r.save()
    assert any(e["type"] == "eval" for e in run.all_events())
    enc = r.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    r.model.eval()
    trained_state = _quant_state(r.model)
    with torch.no_grad():
        trained = r.model(**enc).logits.clone()
    r.cleanup()

    model, tok = modeling.load_for_inference(cfg, {"tuned": run.adapter_dir})
    tok.padding_side = "right"
    with torch.no_grad():
        chat = model(**tok(PROMPTS, return_tensors="pt", padding=True)).logits
    torch.testing.assert_close(chat, trained, rtol=0, atol=1e-5)
    loaded = {k.replace("base_model.model.", "", 1): v for k, v in _quant_state(model).items()}
    _assert_same_state({k.replace("base_model.model.", "", 1): v for k, v in trained_state.items()}, loaded)
