"""GPU tier: what a run switches on stays on its own model.

A run with Liger's kernels leaves transformers' Mistral module exactly as it was, so a model built afterwards
in the same process (the app's Playground model, or the tiny CPU model, as a later test builds) runs its own
code; and the instance-level kernels learn what the plain model learns (first losses within 1e-2 relative:
RMSNorm, SwiGLU and RoPE kernels, and the fused linear cross-entropy where no CUDA graphs run, against
transformers' fp16 ops).
"""

import math
import os
from pathlib import Path

import pytest
from gpu_checks import onoff

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _run(tmp_path, name, liger, **over):
    from bench.common import random_model, synthetic_alpaca
    from studio.presets import load_preset
    from studio.runs import RunStore
    from studio.training import Recipe

    work = Path(os.environ.get("STUDIO_BENCH_WORK", "/tmp/qlora-bench"))
    model_dir = random_model(work / "mistral-7b-width-2-layers", layers=2)
    data = synthetic_alpaca(tmp_path / "data.jsonl", 96, seed=5)
    cfg = load_preset("mistral-7b-finance-fast").replace({
        "model.base_model": str(model_dir), "data.path": str(data), "data.hub_dataset": "", "data.mapping": {},
        "data.train_samples": 0, "data.val_samples": 16, "train.max_steps": 4, "train.logging_steps": 1,
        "train.eval_steps": 2, "train.save_steps": 0, "train.sample_prompts": 1, "speed.liger": onoff(liger),
        "output.adapter_dir": "", **over})
    run = RunStore(tmp_path / "runs").create(cfg, name)
    assert Recipe(run).execute() == "completed", run.last_status()
    return run


def test_liger_stays_on_its_model_and_learns_the_same(tmp_path):
    import transformers.models.mistral.modeling_mistral as mm
    from transformers import AutoModelForCausalLM

    from studio.tiny_model import ensure_tiny_model

    before = dict(vars(mm))
    liger = _run(tmp_path, "liger", True)
    kernels = [e for e in liger.all_events() if e["type"] == "liger"]
    graphs = next(e for e in liger.all_events() if e["type"] == "plan")["cuda_graphs"]
    # Beside CUDA graphs the loss is transformers' own (Liger's fused loss waits for the GPU every step).
    assert kernels and set(kernels[0]["kernels"]) == {"swiglu", "rms_norm", "rope"} | (
        set() if graphs else {"fused_linear_cross_entropy"})
    assert [k for k, v in vars(mm).items() if before.get(k) is not v] == []
    assert set(vars(mm)) == set(before)

    plain = _run(tmp_path, "plain", False)
    first = [[e["loss"] for e in r.all_events() if e["type"] == "metric"] for r in (plain, liger)]
    assert len(first[0]) == len(first[1]) == 4 and all(math.isfinite(x) for x in first[0] + first[1])
    assert abs(first[1][0] - first[0][0]) / first[0][0] < 1e-2, first
    evals = [[e["eval_loss"] for e in r.all_events() if e["type"] == "eval"] for r in (plain, liger)]
    assert evals[0] and evals[1] and abs(evals[1][-1] - evals[0][-1]) / evals[0][-1] < 1e-2, evals

    # A model built afterwards in this process runs transformers' own (CPU) code.
    tiny = AutoModelForCausalLM.from_pretrained(str(ensure_tiny_model()), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 11]])
    with torch.no_grad():
        out = tiny(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss) and out.logits.shape[-1] == tiny.config.vocab_size


def _liger_in_graph(out) -> bool:
    """Whether a Liger autograd function made ``out`` or anything it was computed from."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "Liger" in type(fn).__name__:
            return True
        todo += [f for f, _ in fn.next_functions]
    return False


def test_liger_layers_run_with_gradients_and_transformers_own_code_without():
    """Training (autograd on) runs Liger's RMSNorm, SwiGLU and RoPE; evaluation and the sample answers (no
    gradients) run each module's own transformers code, which costs a decoding step less host time."""
    from transformers import AutoModelForCausalLM

    from bench.common import random_model
    from studio.speed.liger import apply_liger

    work = Path(os.environ.get("STUDIO_BENCH_WORK", "/tmp/qlora-bench"))
    model = AutoModelForCausalLM.from_pretrained(str(random_model(work / "mistral-7b-width-2-layers", layers=2)),
                                                 dtype=torch.bfloat16).cuda()
    assert set(apply_liger(model)) == {"fused_linear_cross_entropy", "swiglu", "rms_norm", "rope"}
    layer = model.model.layers[0]
    h = torch.randn(2, 16, model.config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for module in (layer.input_layernorm, layer.mlp):
        assert _liger_in_graph(module(h)), module
        with torch.no_grad():
            assert torch.equal(module(h), type(module).forward(module, h)), module
    ids = torch.tensor([[1, 5, 9, 11]], device="cuda")
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_one_optimizer_update_trains_the_fast_preset_bit_for_bit_as_bitsandbytes_loop(tmp_path):
    """The fast preset through the engine (fp16 with GradScaler, CUDA graphs, paged 8-bit AdamW) with its LoRA
    tensors updated as one (no wait for GradScaler's flag) and one by one: every logged loss, gradient norm and
    learning rate, the loss scale's skips included, and the saved adapter are the same bit for bit."""
    from safetensors.torch import load_file

    over = {"train.max_steps": 12, "train.eval_steps": 6, "train.save_steps": 6, "train.sample_prompts": 0}
    runs = {on: _run(tmp_path, f"flat-{on}", True, **{"speed.flat_optimizer": onoff(on)}, **over) for on in (True, False)}
    assert [e["tensors"] for e in runs[True].all_events() if e["type"] == "flat_optimizer"] == [8]
    assert not [e for e in runs[False].all_events() if e["type"] == "flat_optimizer"]
    logs = {on: [(e["step"], e["loss"], e["grad_norm"], e["learning_rate"]) for e in r.all_events()
                 if e["type"] == "metric"] for on, r in runs.items()}
    assert len(logs[True]) == 12 and logs[True] == logs[False], logs
    adapters = {on: load_file(str(r.adapter_dir / "adapter_model.safetensors")) for on, r in runs.items()}
    assert adapters[True].keys() == adapters[False].keys()
    assert all(torch.equal(adapters[True][k], adapters[False][k]) for k in adapters[True])
