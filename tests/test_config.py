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
    assert c.speed == RunConfig().speed  # every speed part is the planner's
    assert (c.lora.r, c.lora.alpha, c.lora.target_modules) == (32, 64, ["q_proj", "k_proj", "v_proj", "o_proj"])
    t = c.train
    assert (t.scheduler, t.warmup_ratio, t.learning_rate, t.epochs, t.batch_size, t.grad_accum) == \
        ("cosine", 0.1, 1e-4, 5, 4, 4)
    assert t.tensorboard and c.data.max_length == 4096 and c.data.template == "qa"
    assert c.output.hub_private and not c.output.push_to_hub and not c.output.merge


def test_thorough_recipe_checkpoints_on_every_gpu():
    """The seed recipe names gradient checkpointing: the planner keeps it wherever its 4096-token rows run."""
    from studio.speed import plan
    from studio.speed.profiles import PROFILES

    c = load_preset("mistral-7b-instruct-thorough")
    for name, hw in PROFILES.items():
        assert plan(c, hw).gradient_checkpointing, name


def test_shipped_seed_presets_leave_speed_to_the_planner():
    """No -max or -lean twins: the seed presets themselves are fast (every speed part auto)."""
    names = set(list_presets())
    assert not any(n.endswith(("-max", "-lean")) for n in names)
    for name in ("mistral-7b-finance-fast", "mistral-7b-instruct-thorough"):
        assert load_preset(name).speed == RunConfig().speed


def test_keys_of_earlier_versions_load_with_a_warning():
    """Presets and run folders written before the speed section: each old switch lands in speed, pinned."""
    from studio.config import RenamedKey

    old = {"model": {"gradient_checkpointing": True, "fp32_frozen": False, "dequantized_cache": True},
           "train": {"liger": True, "cuda_graphs": False, "auto_batch": False, "batch_size": 2, "grad_accum": 4,
                     "fused_lora": True, "padding_free": False}}
    with pytest.warns(RenamedKey, match="model.gradient_checkpointing is now speed.gradient_checkpointing"):
        c = RunConfig.from_dict(old)
    assert (c.speed.gradient_checkpointing, c.speed.fp32_frozen, c.speed.weight_cache, c.speed.liger,
            c.speed.cuda_graphs, c.speed.fused_lora, c.speed.padding_free) == ("on", "off", "on", "on", "off", "on", "off")
    assert c.speed.micro_batch == 2  # auto_batch off: the micro-batch as written
    with pytest.warns(RenamedKey):
        assert RunConfig.from_dict({"train": {"auto_batch": True}}).speed.micro_batch == 0
    with pytest.warns(RenamedKey):  # a dotted override of an old key still reaches its new place
        assert load_preset("tiny-demo").replace({"model.gradient_checkpointing": True}).speed.gradient_checkpointing == "on"


@pytest.mark.parametrize("over,key", [
    ({"speed.micro_batch": 3}, "speed.micro_batch"),
    ({"speed.offload_checkpoints": "on", "speed.gradient_checkpointing": "off"}, "speed.offload_checkpoints"),
    ({"speed.offload_up_proj": "on", "speed.offload_checkpoints": "off"}, "speed.offload_up_proj"),
    ({"speed.offload_up_proj": "on", "speed.cuda_graphs": "on"}, "speed.offload_up_proj"),
    ({"speed.liger": "yes"}, "speed.liger"),
])
def test_contradictory_speed_pins_name_the_key(over, key):
    with pytest.raises(ConfigError) as e:
        load_preset("mistral-7b-finance-fast").replace(over)
    assert e.value.key == key


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
