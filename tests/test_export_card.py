"""Model cards: every adapter, merged model and zip carries one; its numbers are the run's events, its structure
is pinned by a snapshot (tests/snapshots/model_card_structure.txt; delete it to write a new one on purpose)."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest
import yaml

from studio import export, model_card
from studio.presets import load_preset
from studio.runs import RunStore
from studio.training import Recipe

SNAPSHOT = Path(__file__).parent / "snapshots" / "model_card_structure.txt"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    home = tmp_path_factory.mktemp("card_home")
    old = os.environ.get("STUDIO_HOME")
    os.environ["STUDIO_HOME"] = str(home)
    try:
        cfg = load_preset("tiny-demo").replace({"train.max_steps": 4, "train.sample_prompts": 0,
                                                 "train.logging_steps": 1, "train.eval_steps": 2})
        run = RunStore().create(cfg)
        assert Recipe(run).execute() == "completed", run.last_status()
        adapter_card = (run.adapter_dir / "README.md").read_text()  # as training wrote it, before any export
        from studio.evaluate import evaluate_run

        evaluate_run(run, limit=2, max_new_tokens=8)
        yield dict(run=run, adapter_card=adapter_card)
    finally:
        if old is None:
            os.environ.pop("STUDIO_HOME", None)
        else:
            os.environ["STUDIO_HOME"] = old


def _meta(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def _row(card: str, label: str) -> str:
    return next(line for line in card.splitlines() if line.startswith(f"| {label} |")).split(" | ", 1)[1]


def structure(card: str, run_id: str) -> str:
    """Headings, metadata keys and the first cell of every table row: what a reader navigates by."""
    out = ["meta: " + ", ".join(sorted(_meta(card)))]
    body = card.split("---\n", 2)[2]
    fence = False
    for line in body.splitlines():
        if line.startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        if line.startswith("#"):
            out.append(line.replace(run_id, "<run>"))
        elif line.startswith("| ") and not line.startswith("|---"):
            out.append("  " + line.split(" | ")[0] + " |")
    return "\n".join(out) + "\n"


def test_training_writes_a_card_into_the_adapter_whose_numbers_are_the_runs_events(finished):
    run, card = finished["run"], finished["adapter_card"]
    evs = run.all_events()
    metrics = [e for e in evs if e["type"] == "metric"]
    evals = [e for e in evs if e["type"] == "eval"]
    data = next(e for e in evs if e["type"] == "data")
    meta = _meta(card)
    assert meta["library_name"] == "peft" and "qlora-studio" in meta["tags"] and meta["model_name"] == run.id
    assert (run.adapter_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _row(card, "final training loss") == f"{model_card._fmt(metrics[-1]['loss'])} (step {metrics[-1]['step']}) |"
    assert _row(card, "final validation loss") == f"{model_card._fmt(evals[-1]['eval_loss'])} (step {evals[-1]['step']}) |"
    assert _row(card, "training examples") == f"{data['train']} |"
    assert _row(card, "validation examples") == f"{data['validation']} |"
    assert _row(card, "optimizer steps") == "4 |" and _row(card, "hardware") == "CPU |"
    from studio.paths import shipped_file

    sha = hashlib.sha256(shipped_file(run.config().data.path).read_bytes()).hexdigest()
    assert _row(card, "train file sha256") == f"`{sha}` |"
    cfg = run.config()
    for key in ("lora.r", "lora.alpha", "train.learning_rate", "train.max_steps", "data.max_length", "train.seed"):
        section, name = key.split(".")
        assert _row(card, f"`{key}`") == f"{model_card._fmt(getattr(getattr(cfg, section), name))} |"
    f = model_card.facts(run)
    assert len([k for k in f["hyperparameters"]]) == sum(len(vars(getattr(cfg, s))) for s in ("model", "lora",
                                                                                             "data", "train"))
    assert "No evaluation was run" in card and "No GGUF file was exported yet." in card
    start = next(e for e in evs if e["type"] == "status" and e["status"] == "running")["t"]
    assert 0 <= f["train_seconds"] <= evs[-1]["t"] - start + 1


def test_exports_refresh_the_card_with_the_evaluation_and_zip_it(finished):
    run = finished["run"]
    z = export.adapter_zip(run)
    names = zipfile.ZipFile(z).namelist()
    assert f"{run.id}-adapter/README.md" in names and f"{run.id}-adapter/loss_curve.png" in names
    card = (run.adapter_dir / "README.md").read_text()
    ev = json.loads((run.dir / "evaluation.json").read_text())
    for metric, tuned in ev["tuned"].items():
        assert _row(card, metric) == f"{model_card._fmt(ev['base'][metric])} | {model_card._fmt(tuned)} |"
    merged = export.merge(run)
    mcard = (merged / "README.md").read_text()
    assert _meta(mcard)["library_name"] == "transformers"
    assert mcard.index("### transformers (the merged model)") < mcard.index("### transformers + peft")


def test_card_structure_matches_the_snapshot(finished):
    run = finished["run"]
    got = structure(model_card.render(run, "adapter"), run.id)
    if not SNAPSHOT.exists():
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(got)
        pytest.fail(f"wrote a new snapshot to {SNAPSHOT}; review it and run again")
    assert got == SNAPSHOT.read_text()
    assert [h for h in got.splitlines() if h.startswith("## ")] == [f"## {s}" for s in model_card.SECTIONS]


def test_push_carries_the_card_and_is_private_by_default(finished, monkeypatch):
    """The Hub client is replaced (no network in tests); what the studio hands it is checked."""
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = bool(token)

        def create_repo(self, repo_id, private, exist_ok):
            calls["private"] = private

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            calls["card"] = (Path(folder_path) / "README.md").read_text()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    run = finished["run"]
    assert export.push(run, "someone/tiny", None) == "https://huggingface.co/someone/tiny"
    assert calls["private"] is True and "README.md" in calls["files"] and "loss_curve.png" in calls["files"]
    assert 'from_pretrained(base, "someone/tiny")' in calls["card"]
