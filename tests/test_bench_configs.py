"""Every engine variant the GPU benchmark names builds a valid config here, so a GPU call never spends its
minutes on a ConfigError; and the lean variants are what their names say."""

import pytest

from bench.shapes import SHAPES
from bench.train_speed import VARIANTS, run_name, studio_config, variant_overrides
from studio.security import check_name

ENGINE = [v for v in VARIANTS if v != "seed"] + [f"{b}@{s}" for s in SHAPES for b in ("studio", "lean", "lean-up")]


@pytest.mark.parametrize("variant", ENGINE)
def test_bench_variant_builds_a_valid_config(variant, monkeypatch):
    from studio import modeling

    monkeypatch.setattr(modeling, "GC_KWARGS", dict(modeling.GC_KWARGS))  # -nonreentrant switches it process-wide
    cfg = studio_config(variant, "/models/random-mistral", "/data/long.jsonl", 10, variant_overrides(variant))
    check_name(run_name(variant), "run name")  # run_studio's run folder
    assert cfg.train.max_steps == 10 and cfg.data.path == "/data/long.jsonl"
    if variant.startswith("lean"):
        shape = SHAPES[variant.split("@")[1]]
        assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.data.max_length) == (shape["batch"], shape["accum"],
                                                                                     shape["seq"])
        assert cfg.train.fused_lora and cfg.model.offload_checkpoints and cfg.model.gradient_checkpointing
        assert cfg.model.offload_up_proj == variant.startswith("lean-up")
    if variant == "studio-max-fused":
        assert cfg.train.fused_lora and cfg.lora.dropout == 0.05  # the fast preset's dropout, fused
