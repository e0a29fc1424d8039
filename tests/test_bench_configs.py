"""The benchmark measures what users run: its preset variants are the CLI command a user types, and that command
builds the shipped preset unchanged except for the model folder and the data file, so a GPU call never spends its
minutes on a ConfigError."""

import pytest

from bench.train_speed import GROUPS, preset_command


@pytest.mark.parametrize("preset", [v[7:] for g in GROUPS.values() for v in g.split(",") if v.startswith("preset:")])
def test_bench_runs_the_shipped_preset_through_the_cli(preset):
    from studio.cli import _config, parser
    from studio.presets import load_preset

    cmd = preset_command(preset, "/models/random-mistral", "/data/long.jsonl")
    assert cmd[1:4] == ["-m", "studio", "train"]
    args = parser().parse_args(cmd[3:])
    cfg = _config(args)
    shipped = load_preset(preset)
    assert cfg.speed == shipped.speed  # the planner decides, as for a user
    assert cfg.replace({"model.base_model": shipped.model.base_model, "data.path": shipped.data.path,
                        "data.mapping": shipped.data.mapping, "output.run_name": ""}) == shipped
    partial = _config(parser().parse_args(preset_command(preset, "/m", "/d.jsonl", steps=6)[3:]))
    assert partial.train.max_steps == 6
