"""The planner's choice on every GPU users train on, decided on the CPU against simulated device profiles.

What each preset runs on a T4, L4, A100 40/80, H100 and H200 is written down here (and in docs/speed.md); what
is learned never changes; whatever a card lacks (bf16, Triton, several GPUs, host RAM) falls back with a note
and never raises."""

import dataclasses

import pytest

from studio.config import SPEED_SWITCHES
from studio.estimate import KNOWN
from studio.hardware import Hardware
from studio.presets import load_preset
from studio.speed import plan
from studio.speed.profiles import PROFILES

GiB = 2**30
CPU = Hardware("cpu", "CPU", 24 * GiB, 0, True, None, 24 * GiB)

# (micro-batch, accumulation, dtype, the switches that are on), per card.
ALWAYS = {"liger", "fused_lora", "graph_decode"}  # on every GPU of these, for both presets
FAST = {"T4 16 GB": (4, 2, "fp16", ALWAYS | {"cuda_graphs", "flat_optimizer"}),
        "L4 24 GB": (8, 1, "fp16", ALWAYS | {"cuda_graphs", "flat_optimizer"}),
        **{gpu: (8, 1, "fp16", ALWAYS | {"weight_cache", "cuda_graphs", "flat_optimizer"})
           for gpu in ("A100 40 GB", "A100 80 GB", "H100 80 GB", "H200 141 GB")}}
LEAN = ALWAYS | {"gradient_checkpointing", "offload_checkpoints"}
THOROUGH = {"T4 16 GB": (4, 4, "fp16", LEAN),  # 12.7 GiB of Colab RAM: no room for the kept up-projections
            **{gpu: (4, 4, "bf16", LEAN | {"offload_up_proj"})
               for gpu in ("L4 24 GB", "A100 40 GB", "A100 80 GB", "H100 80 GB", "H200 141 GB")}}


def _on(p) -> set:
    return {k for k in SPEED_SWITCHES if getattr(p, k)}


@pytest.mark.parametrize("gpu", list(PROFILES))
@pytest.mark.parametrize("preset,table", [("mistral-7b-finance-fast", FAST), ("mistral-7b-instruct-thorough", THOROUGH)])
def test_each_gpu_gets_the_written_down_plan_and_it_fits(preset, table, gpu):
    cfg, hw = load_preset(preset), PROFILES[gpu]
    p = plan(cfg, hw)
    assert (p.micro_batch, p.grad_accum, p.compute_dtype, _on(p)) == table[gpu]
    assert p.estimate_gib < hw.total_bytes / GiB * 0.85
    assert p.micro_batch * p.grad_accum == cfg.effective_batch  # the effective batch never changes
    assert set(p.reasons) >= {"micro_batch", "compute_dtype", *SPEED_SWITCHES} and all(p.reasons.values())


def test_the_t4_has_no_bf16_so_the_thorough_recipe_runs_fp16_with_a_note():
    p = plan(load_preset("mistral-7b-instruct-thorough"), PROFILES["T4 16 GB"])
    assert p.compute_dtype == "fp16" and any("no bf16" in n for n in p.notes)


def test_what_is_learned_is_never_planned():
    """The planner returns a Plan; the config it was given (examples, epochs, schedule, optimizer, LoRA) is
    untouched, whatever the card."""
    for preset in ("mistral-7b-finance-fast", "mistral-7b-instruct-thorough", "tiny-demo"):
        cfg = load_preset(preset)
        before = cfg.to_dict()
        for hw in [*PROFILES.values(), CPU]:
            plan(cfg, hw)
        assert cfg.to_dict() == before


def test_the_cpu_takes_the_plain_path_without_recompute():
    p = plan(load_preset("tiny-demo"), CPU)
    assert _on(p) == {"fp32_frozen"} and (p.micro_batch, p.grad_accum) == (8, 1) and p.compute_dtype == "fp32"
    assert "CUDA GPU" in p.reasons["liger"] and not p.notes


def test_gpu_only_pins_fall_back_on_the_cpu_with_a_note():
    cfg = load_preset("tiny-demo").replace({"speed.liger": "on", "speed.cuda_graphs": "on", "speed.weight_cache": "on"})
    p = plan(cfg, CPU)
    assert not (p.liger or p.cuda_graphs or p.weight_cache)
    assert len(p.notes) == 3 and all("needs a CUDA GPU" in n for n in p.notes)


def test_parts_a_cpu_can_run_are_kept_when_pinned():
    cfg = load_preset("tiny-demo").replace({"speed.gradient_checkpointing": "on", "speed.offload_checkpoints": "on",
                                            "speed.offload_up_proj": "on", "speed.fused_lora": "on",
                                            "speed.padding_free": "on"})
    assert _on(plan(cfg, CPU)) >= {"gradient_checkpointing", "offload_checkpoints", "offload_up_proj", "fused_lora",
                                   "padding_free"}


def test_liger_missing_on_this_machine_is_a_reason_and_a_pin_is_a_note():
    cfg = load_preset("mistral-7b-instruct-thorough")
    p = plan(cfg, PROFILES["H100 80 GB"], liger_installed=False)
    assert not p.liger and "pip install liger-kernel" in p.reasons["liger"] and not p.notes
    p = plan(cfg.replace({"speed.liger": "on"}), PROFILES["H100 80 GB"], liger_installed=False)
    assert not p.liger and any("liger-kernel is not installed" in n for n in p.notes)


def test_one_optimizer_update_needs_bitsandbytes_8bit_adam_and_short_rows():
    fast, h100 = load_preset("mistral-7b-finance-fast"), PROFILES["H100 80 GB"]
    assert plan(fast, h100).flat_optimizer
    p = plan(fast.replace({"train.optimizer": "adamw_torch"}), h100)
    assert not p.flat_optimizer and "8-bit Adam" in p.reasons["flat_optimizer"] and not p.notes
    p = plan(fast.replace({"train.optimizer": "adamw_torch", "speed.flat_optimizer": "on"}), h100)
    assert not p.flat_optimizer and any("speed.flat_optimizer is on" in n for n in p.notes)
    p = plan(load_preset("mistral-7b-instruct-thorough"), h100)  # long rows: the launches hide behind matmuls
    assert not p.flat_optimizer and "long rows" in p.reasons["flat_optimizer"].lower()
    assert plan(load_preset("mistral-7b-instruct-thorough").replace({"speed.flat_optimizer": "on"}), h100).flat_optimizer
    # The plan's memory estimate counts the merged gradient buffer.
    assert plan(fast, h100).estimate_gib >= plan(fast.replace({"speed.flat_optimizer": "off"}), h100).estimate_gib


def test_an_old_card_without_triton_support_runs_eagerly():
    old = dataclasses.replace(PROFILES["T4 16 GB"], name="Tesla P100", capability=(6, 0))
    p = plan(load_preset("mistral-7b-finance-fast").replace({"speed.cuda_graphs": "on"}), old)
    assert not p.liger and not p.cuda_graphs and any("too old" in n for n in p.notes)


@pytest.mark.parametrize("extra", [{"train.num_gpus": 2}, {"train.num_gpus": 2, "train.fsdp": True}])
def test_several_gpus_take_the_tested_data_parallel_path(extra):
    cfg = load_preset("mistral-7b-instruct-thorough").replace({**extra, "speed.cuda_graphs": "on"})
    p = plan(cfg, dataclasses.replace(PROFILES["H100 80 GB"], gpu_count=2))
    assert _on(p) == {"gradient_checkpointing", "fp32_frozen"}
    assert any("graphs run on one GPU" in n for n in p.notes)


def test_the_preference_stage_takes_the_plain_path():
    cfg = load_preset("mistral-7b-finance-fast").replace({"prefer.parent_run": "sft-run"})
    p = plan(cfg, PROFILES["H100 80 GB"])
    assert _on(p) == {"gradient_checkpointing", "fp32_frozen"} and "TRL" in p.reasons["liger"]


def test_checkpointing_with_dropout_is_never_graphed():
    """A graphed recompute cannot redraw the forward's dropout mask."""
    cfg = load_preset("mistral-7b-finance-fast").replace({"speed.gradient_checkpointing": "on"})
    p = plan(cfg, PROFILES["H100 80 GB"])
    assert p.gradient_checkpointing and not p.cuda_graphs and "dropout" in p.reasons["cuda_graphs"]
    p = plan(cfg.replace({"lora.dropout": 0.0}), PROFILES["H100 80 GB"])
    assert p.gradient_checkpointing and p.cuda_graphs


def test_short_host_ram_keeps_checkpoints_on_the_gpu():
    cfg = load_preset("mistral-7b-instruct-thorough")
    p = plan(cfg, PROFILES["H100 80 GB"], host_free=6 * GiB)  # layer inputs need 4 GiB pinned: over half of 6
    assert p.gradient_checkpointing and not p.offload_checkpoints and not p.offload_up_proj
    assert "pinned RAM" in p.reasons["offload_checkpoints"]
    p = plan(cfg, PROFILES["H100 80 GB"], host_free=16 * GiB)  # room for inputs, not for the 16 GiB of up-projections
    assert p.offload_checkpoints and not p.offload_up_proj and "pinned RAM" in p.reasons["offload_up_proj"]


def test_pins_are_kept_and_named_as_pins():
    cfg = load_preset("mistral-7b-finance-fast").replace({"speed.cuda_graphs": "off", "speed.micro_batch": 2})
    p = plan(cfg, PROFILES["H100 80 GB"])
    assert not p.cuda_graphs and "set to off in speed.cuda_graphs" in p.reasons["cuda_graphs"].lower()
    assert (p.micro_batch, p.grad_accum) == (2, 4) and "speed.micro_batch" in p.reasons["micro_batch"]


def test_a_config_that_fits_nowhere_gets_the_leanest_plan_and_a_note():
    cfg = load_preset("mistral-7b-instruct-thorough").replace({"data.max_length": 32768, "train.batch_size": 16,
                                                               "train.grad_accum": 1})
    p = plan(cfg, PROFILES["T4 16 GB"])
    assert p.micro_batch == 1 and p.gradient_checkpointing
    assert any("over Tesla T4's memory" in n for n in p.notes)


def test_flash_attention_packs_long_rows():
    cfg = load_preset("mistral-7b-instruct-thorough").replace({"model.attn_implementation": "flash_attention_2"})
    assert plan(cfg, PROFILES["A100 80 GB"]).padding_free
    assert not plan(load_preset("mistral-7b-instruct-thorough"), PROFILES["A100 80 GB"]).padding_free


def test_an_unknown_model_shape_still_plans_without_an_estimate():
    cfg = load_preset("mistral-7b-finance-fast")
    p = plan(cfg, PROFILES["L4 24 GB"], arch=None)
    assert p.estimate_gib is None and p.cuda_graphs and (p.micro_batch, p.grad_accum) == (8, 1)


def test_the_plan_is_an_event_and_a_table():
    p = plan(load_preset("mistral-7b-instruct-thorough"), PROFILES["H200 141 GB"], arch=KNOWN[
        "mistralai/Mistral-7B-Instruct-v0.3"])
    ev = p.to_event()
    assert ev["micro_batch"] == 4 and ev["offload_up_proj"] is True and isinstance(ev["notes"], list)
    rows = p.rows()
    assert [r[0] for r in rows][:3] == ["micro-batch", "compute dtype", "checkpointing"]
    assert all(len(r) == 3 and r[2] for r in rows)
