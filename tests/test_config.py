"""RunConfig and presets: every preset loads, the seed recipes are exact, bad values name their key."""

import pytest

from studio.config import ConfigError, RunConfig, field_specs
from studio.presets import list_presets, load_preset, parse_yaml, save_preset, to_yaml


def test_every_preset_loads():
    presets = list_presets()
    assert {"mistral-7b-finance-fast", "mistral-7b-instruct-thorough", "tiny-demo"} <= set(presets)
    for name, path in presets.items():
        cfg = load_preset(path)
        assert cfg.name == name


def test_fast_preset_is_the_seed_recipe():
    c = load_preset("mistral-7b-finance-fast")
    assert c.model.base_model == "mistralai/Mistral-7B-v0.1"
    assert (c.model.quantization, c.model.double_quant, c.model.compute_dtype) == ("nf4", False, "fp16")
    assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.target_modules) == (8, 32, 0.05, ["q_proj", "v_proj"])
    t = c.train
    assert (t.epochs, t.batch_size, t.grad_accum, t.learning_rate, t.optimizer) == (1, 4, 2, 2e-4, "paged_adamw_8bit")
    assert (c.data.max_length, c.data.train_samples, c.data.val_samples, c.data.template) == (128, 20000, 1000, "alpaca")
    assert c.output.adapter_dir == "./mistral-lora-finance-adapter-fast"


def test_thorough_preset_is_the_seed_recipe():
    c = load_preset("mistral-7b-instruct-thorough")
    assert c.model.base_model == "mistralai/Mistral-7B-Instruct-v0.3"
    assert (c.model.quantization, c.model.double_quant, c.model.compute_dtype) == ("nf4", True, "bf16")
    assert c.model.gradient_checkpointing
    assert (c.lora.r, c.lora.alpha, c.lora.target_modules) == (32, 64, ["q_proj", "k_proj", "v_proj", "o_proj"])
    t = c.train
    assert (t.scheduler, t.warmup_ratio, t.learning_rate, t.epochs, t.batch_size, t.grad_accum) == \
        ("cosine", 0.1, 1e-4, 5, 4, 4)
    assert t.tensorboard and c.data.max_length == 4096 and c.data.template == "qa"
    assert c.output.hub_private and not c.output.push_to_hub and not c.output.merge


def test_lean_thorough_preset_learns_what_the_thorough_recipe_learns():
    """Only switches that change speed and memory differ (their sameness is tested in test_lean, test_padding_free)."""
    recipe, lean = load_preset("mistral-7b-instruct-thorough"), load_preset("mistral-7b-instruct-thorough-lean")
    speed = {"model.fp32_frozen": False, "model.offload_checkpoints": True, "model.offload_up_proj": True,
             "train.fused_lora": True, "train.liger": True, "train.padding_free": True}
    assert lean.replace({"name": recipe.name, "description": recipe.description}) == recipe.replace(speed)
    assert lean.lora.dropout == 0.05 and lean.effective_batch == 16


def test_every_field_has_help_and_bounds():
    for key, f in field_specs().items():
        assert f.metadata.get("help"), key
        if f.type in ("int", "float") or f.type in (int, float):
            assert "min" in f.metadata and "max" in f.metadata, key


@pytest.mark.parametrize("data,key", [
    ({"train": {"learning_rat": 1e-4}}, "train.learning_rat"),
    ({"train": {"learning_rate": 5.0}}, "train.learning_rate"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"train": {"batch_size": "four"}}, "train.batch_size"),
    ({"lora": {"r": 2.5}}, "lora.r"),
    ({"model": {"quantization": "nf3"}}, "model.quantization"),
    ({"model": {"quantization": "int8", "double_quant": True}}, "model.double_quant"),
    ({"data": {"val_samples": 10, "val_fraction": 0.1}}, "data.val_samples"),
    ({"lora": {"target_modules": []}}, "lora.target_modules"),
    ({"output": {"push_to_hub": True, "hub_repo": "noslash"}}, "output.hub_repo"),
    ({"bogus": 1}, "bogus"),
    ({"train": []}, "train"),
])
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(data)
    assert e.value.key == key
    assert key in str(e.value)


def test_run_name_is_validated():
    with pytest.raises(Exception) as e:
        RunConfig.from_dict({"output": {"run_name": "../etc"}})
    assert "run_name" in str(e.value)


def test_yaml_round_trip_and_overrides():
    c = load_preset("tiny-demo")
    again = parse_yaml(to_yaml(c))
    assert again == c
    c2 = c.replace({"train.learning_rate": 1e-3, "lora.target_modules": "q_proj,v_proj"})
    assert c2.train.learning_rate == 1e-3 and c2.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="train.nope"):
        c.replace({"train.nope": 1})


def test_bad_yaml_names_the_line():
    with pytest.raises(ConfigError, match="line 2"):
        parse_yaml("model:\n  base_model: a: b\n", "x.yaml")


def test_save_user_preset(studio_home):
    c = load_preset("tiny-demo")
    p = save_preset(c, "my-preset")
    assert p.parent == studio_home / "presets"
    assert load_preset("my-preset").name == "my-preset"
    with pytest.raises(ConfigError):
        save_preset(c, "tiny-demo")
    with pytest.raises(Exception):
        save_preset(c, "../escape")
