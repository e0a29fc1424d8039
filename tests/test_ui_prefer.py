"""The preference stage in the UI's handlers, on one short, really trained tiny-demo run.

Blind votes cast in the Playground (rendered conversations, as the page saves them) are counted for the run,
checked and trained on from the Train tab's section, through the same worker as training; the stage's chart
draws its rewards and log-probabilities; the Playground then loads the stage beside its SFT adapter and pits
the two against each other blind.  Bad input comes back as a message naming the file, line and field.
"""

from __future__ import annotations

import json
import random
import time

import pytest

from studio import votes
from studio.generate import Sampling
from studio.presets import load_preset
from studio.runs import TERMINAL, RunStore
from studio.training import Recipe
from studio.ui import playground, stage, train
from studio.ui.context import UIContext

RUN = "sft"
PROMPTS = ["Calculate the ROI for a cost of $7,500 and a final value of $19,500.",
           "What is the simple interest on $1,000 at 5% per year for 3 years?",
           "What is compound interest?", "Define liquidity.", "What is a bond?", "Explain inflation.",
           "What is a dividend?", "Calculate the margin for revenue $500 and cost $300."]
SAMPLING = Sampling(max_new_tokens=16, temperature=0.9, seed=3)
STAGE_DONE_S = 300  # worker start, NF4 load and a few DPO steps on two busy CPU cores


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A studio home holding one finished SFT run (8 steps, checkpoints at 4 and 8)."""
    path = tmp_path_factory.mktemp("stage_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_HOME", str(path))
        cfg = load_preset("tiny-demo").replace({"train.max_steps": 8, "train.save_steps": 4, "train.eval_steps": 0,
                                                "train.sample_prompts": 0})
        run = RunStore().create(cfg, RUN)
        assert Recipe(run).execute() == "completed"
        yield path


@pytest.fixture(autouse=True)
def same_home(home, studio_home, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(home))


@pytest.fixture(scope="module")
def ctx(home):
    return UIContext(store=RunStore(home / "runs"))


@pytest.fixture(scope="module")
def voted(ctx, home):
    """Eight blind votes on the SFT run as the Playground casts them: seven first turns, one second turn."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_HOME", str(home))
        status, _ = playground.load(ctx.holder, ctx.store, RUN, [])
        assert "Loaded" in status, status
        rng, session, history = random.Random(1), None, []
        for i, text in enumerate(PROMPTS):
            for seed in range(10):  # two equal answers are a tie, not a pair: sample again, as a person would
                s = Sampling(SAMPLING.max_new_tokens, SAMPLING.temperature, seed=seed)
                *_, mapping = last(playground.blind_turn(ctx.holder, text, history if i == 7 else [], "final", s,
                                                         rng=rng))
                if mapping["A"]["text"].strip() != mapping["B"]["text"].strip():
                    break
            if i == 6:
                history = playground.continue_with(mapping, "A")[0]
            _, msg, _, session = playground.vote("A" if i % 2 else "B", mapping, session)
            assert "Saved" in msg
    return [json.loads(line) for line in (home / "preferences.jsonl").read_text().splitlines()]


def last(gen):
    out = None
    for out in gen:
        pass
    return out


def wait_until_done(run, timeout: float = STAGE_DONE_S) -> str:
    deadline = time.monotonic() + timeout
    while run.status not in TERMINAL or run.worker_alive():
        assert time.monotonic() < deadline, f"stage {run.id} still {run.status}:\n{run.log_tail()}"
        time.sleep(0.5)
    return run.status


def test_playground_counts_the_votes_and_the_stage_reads_them_through_their_conversation(ctx, voted):
    text, button = playground.pairs_update(ctx.store, playground.votes_run(ctx.holder, None))
    assert f"8 pairs voted for run `{RUN}`" in text and button.interactive
    assert voted[-1]["turn"] == 2 and voted[-1]["base_model"] == "studio-tiny-mistral"
    cfg = votes.stage_config(ctx.store.get(RUN), preset="dpo-tiny")
    got = votes.load_pairs(cfg, ctx.store.get(RUN), tokenizer=stage._tokenizer(cfg))
    assert len(got.pairs) == 8
    # The prompt trained on is the user's own text; a later turn keeps the whole conversation as rendered.
    assert [p.prompt for p in got.pairs] == PROMPTS and not got.pairs[0].rendered
    assert got.pairs[-1].rendered == voted[-1]["prompt"] and PROMPTS[6] in got.pairs[-1].rendered


def test_train_section_defaults_and_refusals_name_file_line_and_field(ctx, voted, home, tmp_path):
    assert stage.checkpoint_choices(ctx.store, RUN) == [("final adapter", 0), ("checkpoint 4", 4),
                                                          ("checkpoint 8", 8)]
    cfg = ctx.store.get(RUN).config()
    assert stage.default_preset(cfg) == "dpo-tiny" and stage.default_preset(cfg, "kto") == "kto-mistral-7b"
    assert stage.preset_fields("dpo-tiny") == ("dpo", 0.1, 2e-3, 2.0)
    args = dict(checkpoint=0, method="dpo", preset="dpo-tiny", source=stage.VOTES, path=None, beta=0.1,
                learning_rate=2e-3, epochs=2)

    ready, text = stage.plan(ctx.store, RUN, **args)
    assert ready, text
    assert "**8 pairs**" in text and "DPO" in text and "Fit: estimated peak" in text and "optimizer steps" in text
    # Too few pairs: the studio's votes file, the count and the key to change.
    ready, text = stage.plan(ctx.store, RUN, **{**args, "preset": "dpo-mistral-7b"})
    assert not ready and "preferences.jsonl: 8 usable pairs for run 'sft'" in text and "prefer.min_pairs" in text
    # A file: none uploaded yet, then chosen equal to rejected on its second line, then a vote on another run.
    ready, text = stage.plan(ctx.store, RUN, **{**args, "source": stage.FILE})
    assert not ready and "no file uploaded" in text
    rows = [{"prompt": p, "chosen": f"Answer {i}.", "rejected": f"Other {i}."} for i, p in enumerate(PROMPTS)]
    rows[1]["rejected"] = rows[1]["chosen"]
    bad = tmp_path / "pairs.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path = stage.store_votes_upload(str(bad))
    ready, text = stage.plan(ctx.store, RUN, **{**args, "source": stage.FILE, "path": path})
    assert not ready and "line 2: field 'rejected' is the same text as field 'chosen'" in text
    rows[1]["rejected"], rows[3]["run"] = "Different.", "another-run"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path = stage.store_votes_upload(str(bad))
    ready, text = stage.plan(ctx.store, RUN, **{**args, "source": stage.FILE, "path": path})
    assert not ready and "line 4: field 'run' is 'another-run'" in text
    # A vote whose prompt is not the run's template rendering of its conversation is refused by line and field.
    prefs = home / "preferences.jsonl"
    saved = prefs.read_text()
    try:
        edited = dict(voted[2], prompt=voted[2]["prompt"].replace("### Response:", "Answer:"))
        prefs.write_text(saved + json.dumps(edited) + "\n")
        ready, text = stage.plan(ctx.store, RUN, **args)
        assert not ready and "preferences.jsonl line 9: field 'prompt' is not the run's template (alpaca)" in text
    finally:
        prefs.write_text(saved)
    # A Hub dataset: named, then read (offline here: the reason, not a traceback).
    ready, text = stage.plan(ctx.store, RUN, **{**args, "source": stage.HUB, "hub": " "})
    assert not ready and "prefer.hub_dataset: name a Hub preference dataset" in text
    ready, text = stage.plan(ctx.store, RUN, **{**args, "source": stage.HUB, "hub": "nobody/no-such-prefs"})
    assert not ready and text.startswith("⚠️") and "Traceback" not in text
    # A preset is named, never a file of the server (an API client could send a path).
    ready, text = stage.plan(ctx.store, RUN, **{**args, "preset": "/etc/hostname.yaml"})
    assert not ready and "no preference-stage preset '/etc/hostname.yaml'" in text
    # Start refuses the same way, and no run folder is created.
    before = [r.id for r in ctx.store.list()]
    rid, msg = stage.start(ctx.store, RUN, **{**args, "preset": "dpo-mistral-7b"})
    assert rid is None and msg.startswith("⚠️") and "prefer.min_pairs" in msg
    assert [r.id for r in ctx.store.list()] == before


def test_stage_from_the_train_section_charts_rewards_and_compares_with_sft_blind(ctx, voted, home):
    rid, msg = stage.start(ctx.store, RUN, 0, "dpo", "dpo-tiny", stage.VOTES, None, 0.1, 2e-3, 4)
    assert rid, msg
    assert f"Started DPO stage `{rid}` on run `{RUN}`" in msg
    run = ctx.store.get(rid)
    assert wait_until_done(run) == "completed", run.log_tail()
    events = run.all_events()
    fig = train.loss_figure(events)
    traces = {t.name: t for t in fig.data}
    for name in ("training loss", "reward margin", "reward accuracy", "log-prob chosen", "log-prob rejected"):
        assert len(traces[name].x) >= 2, name  # 4 steps logged every 2
    assert train.is_stage(events) and not train.is_stage(ctx.store.get(RUN).all_events())
    # The new stage is a parent too (stages stack), listed first.
    assert [v for _, v in stage.parent_choices(ctx.store)][:2] == [rid, RUN]

    # The Playground loads the stage beside its SFT adapter; the blind A/B pits DPO against SFT.
    status, dropdown = playground.load(ctx.holder, ctx.store, rid, [])
    assert "Loaded" in status and ctx.holder.adapters == ["dpo", "sft"]
    assert playground.start_adapter(ctx.holder) == "sft" and playground.against_choices(ctx.holder) == \
        ["base", "dpo", "sft"]
    a, b, _, mapping = last(playground.blind_turn(ctx.holder, PROMPTS[0], [], "dpo", SAMPLING, rng=random.Random(0),
                                                  against="sft"))
    assert {mapping["A"]["who"], mapping["B"]["who"]} == {"dpo", "sft"}
    tally, msg, _, session = playground.vote("A", mapping, None)
    assert f"A was **{mapping['A']['who']}**" in msg and f"{mapping['A']['who']} 1" in tally
    rec = json.loads((home / "preferences.jsonl").read_text().splitlines()[-1])
    assert rec["run"] == rid and rec["against"] == "sft" and rec["winner"] == mapping["A"]["who"]
    # Blind against itself is refused as a message.
    with pytest.warns(UserWarning):
        out = last(playground.blind_turn(ctx.holder, PROMPTS[0], [], "dpo", SAMPLING, against="dpo"))
    assert out[-1] is None
    text, _ = playground.pairs_update(ctx.store, rid)
    assert f"1 pair voted for run `{rid}`" in text


def test_a_vote_between_two_equal_answers_is_a_tie_not_a_pair(home):
    prefs = home / "preferences.jsonl"
    before = prefs.read_text() if prefs.exists() else ""
    mapping = {"prompt": "p", "run": RUN, "adapter": "final", "A": {"who": "base", "text": "Same. "},
               "B": {"who": "tuned", "text": "Same."}}
    tally, msg, left, session = playground.vote("B", mapping, None)
    assert "counted as a tie, not saved" in msg and left is None and session["tie"] == 1
    assert (prefs.read_text() if prefs.exists() else "") == before


def test_evaluate_measures_a_stage_against_its_sft_start(ctx, voted):
    from studio.ui import evaluate

    stages = [r for r in ctx.store.list() if r.config().prefer.parent_run and r.has_adapter()]
    if not stages:  # this test alone: train one
        rid, msg = stage.start(ctx.store, RUN, 0, "dpo", "dpo-tiny", stage.VOTES, None, 0.1, 2e-3, 2)
        assert rid, msg
        assert wait_until_done(ctx.store.get(rid)) == "completed"
        stages = [ctx.store.get(rid)]
    status, table, best, worst = evaluate.evaluate(ctx.store, stages[0].id, 4, 8)
    assert status.startswith("Evaluated"), status
    assert table["headers"] == ["metric", "sft", "dpo"] and best["headers"][2:] == ["sft", "dpo", "ROUGE-L (dpo)"]
    assert len(table["data"]) == 4
    # The saved evaluation shows the same sides after a reload.
    assert evaluate.show_saved(ctx.store, stages[0].id)[1]["headers"] == ["metric", "sft", "dpo"]
