"""The command line runs the same engine as the UI and never shows a traceback for bad input."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, env_home, timeout=600):
    import os

    env = {**os.environ, "STUDIO_HOME": str(env_home)}
    return subprocess.run([sys.executable, "-m", "studio", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_train_runs_generate_and_export(studio_home):
    out = cli("train", "--preset", "tiny-demo", "--name", "cli-run", "--set", "train.max_steps=4",
              "--set", "train.eval_steps=0", "--set", "train.save_steps=2", "--set", "train.sample_prompts=0",
              env_home=studio_home)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "run cli-run" in out.stdout and "completed" in out.stdout and "adapter:" in out.stdout
    assert "step" in out.stderr + out.stdout  # the progress bar
    runs = cli("runs", env_home=studio_home)
    assert "cli-run" in runs.stdout and "completed" in runs.stdout
    gen = cli("generate", "--run", "cli-run", "--prompt", "What is ROI?", "--max-new-tokens", "8",
              env_home=studio_home)
    assert gen.returncode == 0 and gen.stdout.strip()
    exp = cli("export", "--run", "cli-run", "--zip", env_home=studio_home)
    assert exp.returncode == 0 and "adapter.zip" in exp.stdout and "PeftModel.from_pretrained" in exp.stdout


def test_bad_input_is_one_line_exit_2(studio_home):
    for args, needle in [
        (("train", "--preset", "tiny-demo", "--set", "train.learning_rate=9"), "train.learning_rate"),
        (("train", "--preset", "tiny-demo", "--set", "train.bogus=1"), "train.bogus"),
        (("train", "--preset", "no-such-preset"), "not found"),
        (("train", "--preset", "tiny-demo", "--data", "/nonexistent.jsonl"), "no such file"),
        (("generate", "--run", "../etc", "--prompt", "x"), "not allowed"),
        (("estimate", "--preset", "tiny-demo", "--set", "lora.r=0"), "lora.r"),
    ]:
        out = cli(*args, env_home=studio_home, timeout=300)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert needle in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_estimate_prints_gpu_table(studio_home):
    out = cli("estimate", "--preset", "mistral-7b-instruct-thorough", env_home=studio_home)
    assert out.returncode == 0
    assert "T4 16 GB" in out.stdout and "H100 80 GB" in out.stdout and "checkpointing" in out.stdout
    out = cli("estimate", "--preset", "mistral-7b-instruct-thorough", "--gpu", "T4 16 GB", env_home=studio_home)
    assert out.returncode == 0 and "T4 16 GB" in out.stdout and "fp16" in out.stdout  # no bf16 there: a note
    assert "has no bf16" in out.stdout
