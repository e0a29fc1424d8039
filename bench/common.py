"""Shared pieces of the GPU benchmarks: a random-weight model of a real architecture, synthetic data
with a stated length distribution, and step timing.

No hub is reachable on the GPU machine, so ``random_model`` builds the architecture from its
config (``studio.estimate.KNOWN`` shapes) with random weights and saves it as safetensors with the
tiny tokenizer beside it (token ids only need to be valid, not meaningful, for speed and memory).

Length distribution (stated, since the real finance set cannot be downloaded here): instruction
words ~ lognormal(median 28, sigma 0.6), response words ~ lognormal(median 60, sigma 0.8), an
``input`` block on a third of the examples (~ lognormal(median 20, sigma 0.6)); at max length 128
about a third of the examples are truncated, as in Alpaca-style finance sets whose answers run long.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

WORDS = ("the rate of return on capital interest loan equity bond yield market price share dividend cash flow "
         "value growth risk asset portfolio income tax revenue profit margin cost debt credit fund index "
         "inflation budget investment savings account balance payment principal period annual monthly").split()


COMPLETE = ".complete"  # written last into a model folder: its presence means every file is there


def random_model(out_dir: str | Path, arch_name: str = "mistralai/Mistral-7B-v0.1", seed: int = 0,
                 layers: int | None = None) -> Path:
    """Build (once) a random-weight model of ``arch_name``'s shape; safe against crashes and concurrent builders.

    The folder is written under a temporary name and renamed when complete, so a build that dies half-way
    leaves nothing that a later call would mistake for a model; a folder without the marker is rebuilt.
    """
    import os
    import shutil
    import tempfile

    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from studio.estimate import KNOWN
    from studio.tiny_model import ensure_tiny_model

    out = Path(out_dir)
    if (out / COMPLETE).exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_tiny_model()))  # before the GPU work: it may build
    a = KNOWN[arch_name]
    cfg = MistralConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=layers or a.layers,
                        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                        max_position_embeddings=32768, rope_theta=1e6 if a.vocab == 32768 else 1e4,
                        sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        torch.manual_seed(seed)
        with torch.device("cuda"):
            model = MistralForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="5GB")
        tokenizer.save_pretrained(str(tmp))
        del model
        torch.cuda.empty_cache()
        (tmp / COMPLETE).write_text(f"{arch_name} layers={layers or a.layers} seed={seed}\n")
        if out.exists() and not (out / COMPLETE).exists():
            shutil.rmtree(out)  # a half-written folder from an older build
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / COMPLETE).exists():  # another builder won the race with the same model: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _words(rng: random.Random, median: float, sigma: float, cap: int = 4000) -> str:
    n = max(1, min(cap, int(rng.lognormvariate(math.log(median), sigma))))
    return " ".join(rng.choice(WORDS) for _ in range(n))


def synthetic_alpaca(path: str | Path, n: int, seed: int = 0, long_rows: int = 0) -> Path:
    """Alpaca records; ``long_rows`` > 0 makes every response that many words (full-length rows)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            rec = {"instruction": _words(rng, 28, 0.6),
                   "input": _words(rng, 20, 0.6) if rng.random() < 1 / 3 else "",
                   "output": " ".join(rng.choice(WORDS) for _ in range(long_rows)) if long_rows
                   else _words(rng, 60, 0.8)}
            f.write(json.dumps(rec) + "\n")
    return Path(path)


class StepTimer:
    """Times optimizer steps after ``warmup`` steps (CUDA-synchronised)."""

    def __init__(self, warmup: int = 3):
        self.warmup = warmup
        self.times: list[float] = []

    def tick(self) -> None:
        import torch

        torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        t = self.times[self.warmup:]
        return (t[-1] - t[0]) / max(len(t) - 1, 1)
