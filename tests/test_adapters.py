"""A run never reports ``completed`` with an adapter that does not hold what was trained: after saving, the
studio reads the adapter back and checks every LoRA tensor's name and shape against the model (and that
training moved them), and an adapter folder holds no pickles."""

import pytest
import torch
from safetensors.torch import save_file

from studio import adapters, modeling
from studio.presets import load_preset
from studio.runs import RunStore
from studio.training import Recipe


def _peft_model(tiny_model_dir):
    cfg = load_preset("tiny-demo").replace({"model.base_model": str(tiny_model_dir)})
    return modeling.add_lora(cfg, modeling.load_base(cfg, modeling.load_tokenizer(cfg)))


def test_the_check_names_what_an_adapter_lacks(tiny_model_dir, tmp_path):
    model = _peft_model(tiny_model_dir)
    want = adapters.expected_shapes(model)
    assert want and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in want)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    good = tmp_path / "good"
    adapters.write_adapter(model, weights, good)
    assert adapters.check_adapter(good, model, trained=False) == len(want)
    with pytest.raises(adapters.AdapterError, match="initial values"):  # B starts at zero: nothing trained
        adapters.check_adapter(good, model, trained=True)

    empty = tmp_path / "empty"  # what FSDP's save wrote: a safetensors file with no tensors
    adapters.write_adapter(model, {}, empty)
    with pytest.raises(adapters.AdapterError, match=f"{len(want)} of {len(want)} LoRA tensors missing"):
        adapters.check_adapter(empty, model, trained=False)

    half = dict(list(weights.items())[: len(weights) // 2])
    adapters.write_adapter(model, half, tmp_path / "half")
    with pytest.raises(adapters.AdapterError, match="missing"):
        adapters.check_adapter(tmp_path / "half", model, trained=False)

    k = next(iter(want))
    save_file({**{n: torch.zeros(s) for n, s in want.items()}, k: torch.zeros(1, 1)},
              str(tmp_path / "good" / "adapter_model.safetensors"))
    with pytest.raises(adapters.AdapterError, match="wrong shape"):
        adapters.check_adapter(good, model, trained=False)

    (tmp_path / "half" / "training_args.bin").write_bytes(b"pickle")
    with pytest.raises(adapters.AdapterError, match="pickled"):
        adapters.check_adapter(tmp_path / "half", model, trained=False)


def test_a_run_whose_adapter_comes_out_empty_fails_instead_of_completing(monkeypatch):
    # The FSDP bug, reproduced: the gathered weights come back empty, so peft writes an adapter with no tensors.
    cfg = load_preset("tiny-demo").replace({"train.max_steps": 3, "train.eval_steps": 0, "train.save_steps": 0,
                                             "train.sample_prompts": 0, "train.logging_steps": 1})
    run = RunStore().create(cfg)
    monkeypatch.setattr(adapters, "lora_weights", lambda trainer: {})
    assert Recipe(run).execute() == "failed"
    last = run.last_status()
    assert last["reason"] == "adapter_incomplete" and "LoRA tensors missing" in last["message"], last
    assert not (run.adapter_dir / "adapter_model.safetensors").exists()
    assert not run.adapter_dir.with_name("adapter.partial").exists()


def test_a_finished_run_saves_a_checked_adapter_without_pickles():
    cfg = load_preset("tiny-demo").replace({"train.max_steps": 3, "train.eval_steps": 0, "train.save_steps": 2,
                                             "train.sample_prompts": 0, "train.logging_steps": 1})
    run = RunStore().create(cfg)
    assert Recipe(run).execute() == "completed", run.last_status()
    files = sorted(p.name for p in run.adapter_dir.iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not [f for f in files if f.endswith(adapters.PICKLES)], files
    assert (run.checkpoints_dir / "checkpoint-2" / "adapter_model.safetensors").exists()
