"""GPU tier: the run's sample answers decoded one CUDA graph replay a token (studio.speed.graph_decode) are the
tokens of the same steps run eagerly, bit for bit, and generate's greedy tokens over the same static cache.

A random-weight model of Mistral-7B's width (2 layers), NF4, fp16 compute (the fast preset's), LoRA on q,v with
non-zero B, three left-padded prompts of different lengths, 64 new tokens: with the model-side parts the planner
gives the fast preset on this GPU (16-bit weight cache, fused LoRA, Liger), and with none of them (bitsandbytes'
own 4-bit layers); with no sliding window and with Mistral-7B-v0.1's 4096-token window (a different cache layer).
"""

import os
import time
from pathlib import Path

import pytest
from gpu_checks import PLAIN

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model(parts: str):
    from bench.common import random_model
    from studio import modeling, speed
    from studio.hardware import detect
    from studio.presets import load_preset

    work = Path(os.environ.get("STUDIO_BENCH_WORK", "/tmp/qlora-bench"))
    model_dir = random_model(work / "mistral-7b-width-2-layers", layers=2)
    cfg = load_preset("mistral-7b-finance-fast").replace({"model.base_model": str(model_dir),
                                                         **(PLAIN if parts == "plain" else {})})
    hw = detect()
    plan = speed.plan(cfg, hw)
    assert plan.graph_decode and plan.weight_cache == (parts == "planned")
    tok = modeling.load_tokenizer(cfg)
    base = modeling.load_base(cfg, tok, hw, dtype=plan.dtype)
    torch.manual_seed(0)
    model = modeling.add_lora(cfg, base, plan)
    speed.prepare_model(model, plan, lambda *a, **k: None)
    for n, p in model.named_parameters():  # LoRA B starts at zero: give it values so the adapter changes answers
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model.eval(), tok


@pytest.mark.parametrize("parts,window", [("planned", None), ("planned", 4096), ("plain", None)])
def test_graphed_sample_answers_are_the_eager_steps_and_generates_tokens(parts, window, monkeypatch):
    from studio.speed.graph_decode import greedy_tokens

    model, tok = _model(parts)
    monkeypatch.setattr(model.config, "sliding_window", window)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 30000, (n,), generator=g).tolist() for n in (20, 35, 50)]
    n = max(map(len, rows))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (n - len(r)) + r for r in rows], device="cuda")
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows], device="cuda")
    args = (model, ids, mask, 64, [tok.eos_token_id], pad)
    took = {}
    for graphed in (False, True, True):  # the second graphed round: what each later evaluation costs
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = greedy_tokens(*args, graphed=graphed)
        torch.cuda.synchronize()
        took[graphed] = (time.perf_counter() - t, out)
    with torch.no_grad():
        static = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
                                temperature=None, top_p=None, top_k=None, eos_token_id=tok.eos_token_id,
                                pad_token_id=pad, cache_implementation="static")[:, n:]
    eager, graphed = took[False][1], took[True][1]
    assert graphed.shape[0] == 3 and graphed.shape[1] > 1
    assert torch.equal(graphed, eager)
    assert torch.equal(graphed, static)
    print(f"\nGRAPH DECODE {parts} window={window}: 3 x {graphed.shape[1]} tokens, eager {took[False][0]:.2f} s, "
          f"graphed {took[True][0]:.2f} s")
