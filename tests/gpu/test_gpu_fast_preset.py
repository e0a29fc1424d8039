"""GPU tier (``pytest -m gpu`` on the GPU machine): the fast preset as shipped (the planner's path for this GPU)
and pinned to the plain path, on a random-weight Mistral-7B-shaped model, train 20 steps with a finite loss, and
the adapter reloads with plain peft."""

import math
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("path", ["planned", "plain"])
def test_fast_preset_trains_20_steps_on_mistral_7b_shape(tmp_path, path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from bench.common import random_model, synthetic_alpaca
    from studio.presets import load_preset
    from studio.runs import RunStore
    from studio.security import output_dir
    from studio.training import Recipe

    work = Path(os.environ.get("STUDIO_BENCH_WORK", "/tmp/qlora-bench"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = random_model(work / "mistral-7b-random")
    data = synthetic_alpaca(tmp_path / "fast.jsonl", 400, seed=3)
    from gpu_checks import PLAIN

    preset = "mistral-7b-finance-fast"
    cfg = load_preset(preset).replace({**(PLAIN if path == "plain" else {}),
        "model.base_model": str(model_dir), "data.path": str(data), "data.hub_dataset": "", "data.mapping": {},
        "data.train_samples": 0, "data.val_samples": 40, "train.max_steps": 20, "train.logging_steps": 1,
        "train.eval_steps": 10, "train.save_steps": 10, "train.sample_prompts": 1,
        "output.adapter_dir": "mistral-lora-finance-adapter-fast"})
    run = RunStore(tmp_path / "runs").create(cfg)
    assert Recipe(run).execute() == "completed", run.last_status()
    metrics = [e for e in run.all_events() if e["type"] == "metric"]
    assert len(metrics) == 20 and all(math.isfinite(e["loss"]) for e in metrics)
    peak = max(e["memory"]["peak"] for e in metrics) / 2**30
    tps = sum(e["tokens_per_s"] for e in metrics[3:]) / len(metrics[3:])
    plan = next(e for e in run.all_events() if e["type"] == "plan")
    if path == "planned":  # what this GPU gets with no switch touched
        assert plan["cuda_graphs"] and plan["fused_lora"] and any(e["type"] == "graphs" for e in run.all_events())
    print(f"\nGPU TIER {preset} ({path}: micro-batch {plan['micro_batch']} x {plan['grad_accum']}): peak allocated "
          f"{peak:.2f} GiB, {tps:.0f} tokens/s (steps 4-20)")
    adir = output_dir("mistral-lora-finance-adapter-fast")  # the relative output lands in <studio home>/outputs/
    tok = AutoTokenizer.from_pretrained(str(adir))
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=q, device_map={"": 0})
    model = PeftModel.from_pretrained(base, str(adir))
    ids = tok("### Instruction:\nHi\n\n### Response:\n", return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits.float()).all()
