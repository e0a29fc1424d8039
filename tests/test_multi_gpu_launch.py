"""Several GPUs on the CPU tier: the launch command, the config rules and rank-0-only events.
(The runs themselves are measured on the GPU machine: bench/multi_gpu.py, results in the README.)"""

import os
import sys

import pytest

from studio import worker
from studio.config import ConfigError
from studio.presets import load_preset
from studio.runs import RunStore


def _run(overrides):
    return RunStore().create(load_preset("tiny-demo").replace(overrides), "")


def test_one_gpu_runs_the_worker_directly():
    run = _run({})
    assert worker.worker_command(run, False) == [sys.executable, "-m", "studio.worker", str(run.dir)]


def test_several_gpus_go_through_accelerate_launch():
    run = _run({"train.num_gpus": 2})
    cmd = worker.worker_command(run, True)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-4:] == ["-m", "studio.worker", str(run.dir), "--resume"]
    fsdp = worker.worker_command(_run({"train.num_gpus": 2, "train.fsdp": True}), False)
    assert "--use_fsdp" in fsdp and "--multi_gpu" not in fsdp
    assert fsdp[fsdp.index("--fsdp_sharding_strategy") + 1] == "FULL_SHARD"


@pytest.mark.parametrize("overrides,key", [
    ({"train.fsdp": True}, "train.fsdp"),
    ({"train.fsdp": True, "train.num_gpus": 2, "model.compute_dtype": "fp16"}, "train.fsdp"),
    ({"train.num_gpus": 0}, "train.num_gpus"),
])
def test_config_rules(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_preset("tiny-demo").replace(overrides)
    assert e.value.key == key


def test_more_gpus_than_visible_is_refused_before_loading():
    from studio.hardware import Hardware
    from studio.modeling import preflight

    cfg = load_preset("mistral-7b-finance-fast").replace({"train.num_gpus": 4})
    with pytest.raises(ConfigError, match="train.num_gpus"):
        preflight(cfg, Hardware("cuda", "H100", 80 * 2**30, 2, True), check_model=False)


def test_only_rank_zero_writes_events(monkeypatch):
    run = _run({})
    before = len(run.all_events())
    monkeypatch.setenv("RANK", "1")
    run.emit("metric", step=1, loss=1.0)
    assert len(run.all_events()) == before
    monkeypatch.setenv("RANK", "0")
    run.emit("metric", step=1, loss=1.0)
    assert len(run.all_events()) == before + 1


def test_worker_sees_exactly_the_gpus_the_run_asked_for(monkeypatch):
    seen = {}

    class FakePopen:
        pid = 999999

        def __init__(self, args, env, **kw):
            seen["env"] = env

        def wait(self):  # the launcher's reaper waits for every process it starts: this one has exited
            return 0

    # Only the process start is replaced: this test reads the environment the worker would get.
    monkeypatch.setattr(worker.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(worker, "_PROCS", {})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    worker._launch(_run({"train.num_gpus": 2}), False)
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "3,5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    worker._launch(_run({}), False)
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == ""  # GPUs hidden on purpose stay hidden
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    worker._launch(_run({}), False)
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert os.environ.get("CUDA_VISIBLE_DEVICES") is None
