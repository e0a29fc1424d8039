"""GPU tier (``pytest -m gpu`` on the GPU machine): the preference stage on the random-weight Mistral-7B shape.

The fast preset's exact LoRA (r8 on q_proj,v_proj, NF4) trains 20 SFT steps on local synthetic data through the
worker the UI starts; then the DPO stage (the shipped ``dpo-mistral-7b`` preset, 20 steps) trains on generated
pairs through the same worker, from that run's adapter, which is also its reference.  Checks: both runs
complete with a finite loss at every step, the stage logs finite rewards and log-probabilities, its adapter
moved away from the SFT adapter it started from, and it reloads with plain transformers + peft onto the
4-bit base.  The line starting ``PREFER_GPU`` gives tokens/s and peak memory of both stages, for the log.
"""

import json
import math
import os
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS = 20
PAIRS = 320  # 20 steps of the preset's 4 x 4 pairs, one pass


def synthetic_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """prompt/chosen/rejected rows of plain words (no template text): the chosen answer ends with a figure and
    its unit, the rejected one is another answer without it, so the two always differ."""
    from bench.common import WORDS

    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": words(rng.randint(8, 24)).capitalize() + "?",
                                "chosen": f"{words(rng.randint(20, 60))} {rng.randint(2, 999)}%.",
                                "rejected": words(rng.randint(20, 60)) + "."}) + "\n")
    return path


def measured(run) -> tuple[float, float, list[dict]]:
    """(mean tokens/s over steps 4-20, peak allocated GiB, metric events) of a finished run."""
    metrics = [e for e in run.all_events() if e["type"] == "metric"]
    peak = max(e["memory"]["peak"] for e in metrics) / 2**30
    tps = sum(e["tokens_per_s"] for e in metrics[3:]) / len(metrics[3:])
    return tps, peak, metrics


def lora_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_dpo_stage_trains_20_steps_on_mistral_7b_shape_from_the_fast_presets_lora(tmp_path, monkeypatch):
    from bench.common import random_model, synthetic_alpaca
    from gpu_checks import assert_adapter_loads
    from studio import votes, worker
    from studio.presets import load_preset
    from studio.runs import RunStore

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))  # the workers inherit it
    work = Path(os.environ.get("STUDIO_BENCH_WORK", "/tmp/qlora-bench"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = random_model(work / "mistral-7b-random")
    data = synthetic_alpaca(tmp_path / "sft.jsonl", 400, seed=3)
    store = RunStore()
    # The fast preset as shipped (its LoRA, quantization, optimizer, lengths), on local data, 20 steps.
    cfg = load_preset("mistral-7b-finance-fast").replace({
        "model.base_model": str(model_dir), "data.path": str(data), "data.hub_dataset": "", "data.mapping": {},
        "data.train_samples": 0, "data.val_samples": 40, "train.max_steps": STEPS, "train.logging_steps": 1,
        "train.eval_steps": 0, "train.save_steps": 0, "train.sample_prompts": 0, "output.adapter_dir": ""})
    sft = worker.start(store, cfg, "sft-fast")
    assert worker.wait(sft, timeout=1800) == "completed", (sft.last_status(), sft.log_tail())
    sft_tps, sft_peak, sft_metrics = measured(sft)
    assert len(sft_metrics) == STEPS and all(math.isfinite(e["loss"]) for e in sft_metrics)

    pairs = synthetic_pairs(tmp_path / "pairs.jsonl", PAIRS, seed=5)
    dpo = votes.start_stage(sft, method="dpo", votes=str(pairs), preset="dpo-mistral-7b", store=store,
                            overrides={"prefer.max_steps": STEPS, "train.logging_steps": 1}, name="dpo-fast")
    assert worker.wait(dpo, timeout=1800) == "completed", (dpo.last_status(), dpo.log_tail())
    dpo_tps, dpo_peak, metrics = measured(dpo)
    assert len(metrics) == STEPS
    for field in ("loss", "reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected"):
        assert all(isinstance(e.get(field), float) and math.isfinite(e[field]) for e in metrics), field

    # The stage trained the SFT adapter further (the reference is a frozen copy of it; every key is there).
    before, after = lora_tensors(sft.adapter_dir), lora_tensors(dpo.adapter_dir)
    assert before.keys() == after.keys() and before
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert_adapter_loads(model_dir, dpo.adapter_dir)
    print(f"\nPREFER_GPU {torch.cuda.get_device_name(0)}: SFT {sft_tps:.0f} tokens/s, peak {sft_peak:.2f} GiB; "
          f"DPO {dpo_tps:.0f} tokens/s, peak {dpo_peak:.2f} GiB ({STEPS} steps each, steps 4-{STEPS}; DPO batch 4 x 4 "
          f"pairs, chosen and rejected rows, reference adapter pass); final reward margin "
          f"{metrics[-1]['reward_margin']:.4f}, accuracy {metrics[-1]['reward_accuracy']:.2f}")
