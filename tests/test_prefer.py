"""The preference stage on the offline tiny model: votes in, a better-liked adapter out.

One SFT parent run (the tiny demo on the sample data with half the figures' units stripped, so its answers
state the unit only some of the time) feeds every test.  The proof: votes that prefer answers stating the
figure with its unit train a DPO stage through the CLI and the worker; on held-out prompts the chosen-minus-
rejected log-probability margin grows and the greedy answers state the unit more often.  In-process stages
(DPO, ORPO, KTO) show the base weights stay bit-identical and the reference stays the SFT adapter.
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from studio import cli, votes
from studio.config import ConfigError
from studio.data.files import DataError
from studio.presets import load_preset
from studio.runs import RunStore
from studio.training import Recipe

SAMPLES = "samples/finance_alpaca.jsonl"
HELD_OUT = "samples/finance_alpaca_val.jsonl"
UNIT = re.compile(r"\d%|\$\d|\d units\b")
FIGURE = re.compile(r"(\$?)\d[\d,]*(?:\.\d+)?(%| units\b)?")


def strip_unit(answer: str) -> str:
    answer = re.sub(r"(\d)%", r"\1", answer)
    answer = re.sub(r"\$(\d)", r"\1", answer)
    return re.sub(r"(\d) units\b", r"\1", answer)


def states_unit(answer: str) -> bool:
    """The answer's first figure comes with its unit ($12, 12%, 12 units)."""
    m = FIGURE.search(answer)
    return bool(m and (m.group(1) or m.group(2)))


def rows(path: str) -> list[dict]:
    from studio.paths import shipped_file

    return [json.loads(line) for line in shipped_file(path).read_text().splitlines() if line.strip()]


def unit_pairs(path: str, n: int | None = None) -> list[votes.Pair]:
    """(prompt, answer with its unit, the same answer without) for each example whose answer has a unit."""
    out = [votes.Pair(r["instruction"], r["output"], strip_unit(r["output"]), r["input"])
           for r in rows(path) if UNIT.search(r["output"])]
    return out[:n]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A finished SFT run whose answers state the unit only some of the time."""
    home = tmp_path_factory.mktemp("prefer_home")
    rng = random.Random(0)
    data = home / "mixed_units.jsonl"
    with open(data, "w") as f:
        for r in rows(SAMPLES):
            if UNIT.search(r["output"]) and rng.random() < 0.5:
                r = {**r, "output": strip_unit(r["output"])}
            f.write(json.dumps(r) + "\n")
    cfg = load_preset("tiny-demo").replace({
        "data.path": str(data), "train.epochs": 1, "train.eval_steps": 0, "train.save_steps": 0,
        "train.sample_prompts": 0, "output.run_name": "sft"})
    store = RunStore(home / "runs")
    run = store.create(cfg)
    assert Recipe(run).execute() == "completed"
    return dict(home=home, store=store, run=run)


def write_votes(path, pairs, run_id: str, **extra) -> None:
    with open(path, "a") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p.prompt, "input": p.input, "chosen": p.chosen, "rejected": p.rejected,
                                "run": run_id, "adapter": "final", "winner": "tuned", **extra}) + "\n")


def generate_batch(model, tok, spec, pairs, max_new_tokens=20) -> list[str]:
    """Greedy answers to every prompt at once (left-padded), the ids generation sends for this template."""
    from studio.data.templates import render_prompt
    from studio.data.tokenize import encode_prompt

    ids = [encode_prompt(tok, render_prompt(p.prompt, spec, tok, input=p.input)) for p in pairs]
    n = max(map(len, ids))
    x = torch.tensor([[tok.pad_token_id] * (n - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (n - len(i)) + [1] * len(i) for i in ids])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return [tok.decode(o[n:], skip_special_tokens=True).strip() for o in out]


# ---- the proof ------------------------------------------------------------------------------------------------

def test_dpo_on_the_studio_votes_moves_answers_toward_the_preferred_property(parent, monkeypatch, capsys):
    from studio.data.templates import TemplateSpec
    from studio.modeling import load_for_inference
    from studio.playground import record_vote
    from studio.prefer import margins

    monkeypatch.setenv("STUDIO_HOME", str(parent["home"]))
    sft = parent["run"]
    # Votes as the Playground saves them: the answer stating the unit won; two votes on another run are left out.
    for p in unit_pairs(SAMPLES, 72):
        record_vote(p.prompt, p.chosen, p.rejected, meta={"input": p.input, "winner": "tuned", "run": sft.id,
                                                          "adapter": "final"})
    for p in unit_pairs(SAMPLES)[-2:]:
        record_vote(p.prompt, p.rejected, p.chosen, meta={"winner": "base", "run": "another-run", "adapter": "final"})
    assert votes.count_pairs(sft) == 72

    # 8 pairs held out: reward accuracy on votes it did not train on, and sample answers at the evaluation.
    assert cli.main(["prefer", "--run", sft.id, "--preset", "dpo-tiny", "--set", "prefer.val_pairs=8",
                     "--set", "train.sample_prompts=2"]) == 0
    out = capsys.readouterr().out
    stage = RunStore().get(f"dpo-{sft.id}")
    assert "completed" in out and "reward margin" in out and str(stage.adapter_dir) in out

    cfg = stage.config()
    assert (cfg.prefer.parent_run, cfg.prefer.parent_checkpoint, cfg.prefer.method) == (sft.id, 0, "dpo")
    evs = stage.all_events()
    data = next(e for e in evs if e["type"] == "data")
    assert (data["train"], data["validation"], data["left_out"]) == (64, 8, 2)
    metrics = [e for e in evs if e["type"] == "metric"]
    assert all(k in metrics[-1] for k in ("loss", "reward_margin", "reward_accuracy", "logps_chosen",
                                          "logps_rejected"))
    assert metrics[-1]["reward_margin"] > metrics[0]["reward_margin"] and metrics[-1]["reward_accuracy"] == 1.0
    ev = [e for e in evs if e["type"] == "eval"]
    assert ev and ev[-1]["reward_accuracy"] >= 0.75 and ev[-1]["reward_margin"] > 0
    assert len([e for e in evs if e["type"] == "sample"]) == 2

    # Held-out prompts, both adapters on one base: the SFT parent against the preference stage.
    held_out = unit_pairs(HELD_OUT, 24)
    model, tok = load_for_inference(cfg, {"sft": sft.adapter_dir, "dpo": stage.adapter_dir})
    spec = TemplateSpec.from_config(cfg.data)
    measured = {}
    for name in ("sft", "dpo"):
        model.set_adapter(name)
        answers = generate_batch(model, tok, spec, held_out)
        measured[name] = (margins(model, tok, spec, held_out), sum(map(states_unit, answers)) / len(answers))
    (m_sft, rate_sft), (m_dpo, rate_dpo) = measured["sft"], measured["dpo"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"held-out margin {mean(m_sft):.3f} -> {mean(m_dpo):.3f}; unit rate {rate_sft:.2f} -> {rate_dpo:.2f}")
    assert mean(m_dpo) > mean(m_sft) + 2.0
    assert sum(b > a for a, b in zip(m_sft, m_dpo)) >= 0.9 * len(held_out)
    assert rate_dpo >= rate_sft + 0.2 and rate_dpo >= 0.8, (rate_sft, rate_dpo)
