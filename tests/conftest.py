"""Shared fixtures.  Every test runs offline, with its own studio home and a canary HF token that
must never appear in any file, log or payload the studio writes (see test_security)."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CANARY = "hf_CanaryTokenDoNotLeak1234567890"
os.environ["HF_TOKEN"] = CANARY
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SAMPLES = ROOT / "samples"


@pytest.fixture(autouse=True)
def studio_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("studio_home")
    monkeypatch.setenv("STUDIO_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_model_dir():
    from studio.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    from studio.data.tokenize import ensure_pad_token

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ensure_pad_token(tok)
    return tok


# ---- test order --------------------------------------------------------------------------------------------
# STUDIO_TEST_ORDER=reverse or random[:SEED] runs the collected tests in another order, to prove that no test
# depends on what an earlier one left behind (in the process or on disk).
def _order() -> tuple[str, int | None]:
    raw = os.environ.get("STUDIO_TEST_ORDER", "").strip()
    kind, _, seed = raw.partition(":")
    if kind == "random":
        return kind, int(seed) if seed else int.from_bytes(os.urandom(2), "big")
    return kind, None


_ORDER = _order()


def pytest_report_header(config):
    kind, seed = _ORDER
    return f"test order: {kind or 'as written'}" + (f" (seed {seed}: STUDIO_TEST_ORDER=random:{seed})"
                                                     if seed is not None else "")


def pytest_collection_modifyitems(config, items):
    kind, seed = _ORDER
    if kind == "reverse":
        items.reverse()
    elif kind == "random":
        random.Random(seed).shuffle(items)
    elif kind:
        raise pytest.UsageError(f"STUDIO_TEST_ORDER={kind!r}: use reverse or random[:SEED]")
