"""Playground, Evaluate and Export tabs against one short, really trained tiny-demo run.

The handlers are the plain functions the tabs wire to their events; the last test serves the three
tabs on 127.0.0.1 and calls their named endpoints through ``gradio_client``.  The canary HF token set
by conftest must never appear in any output.
"""

from __future__ import annotations

import json
import random
import socket
import zipfile

import gradio as gr
import pytest

from studio import playground as engine
from studio.generate import Sampling
from studio.presets import load_preset
from studio.runs import RunStore
from studio.training import Recipe
from studio.ui import evaluate, export, playground, run_picker
from studio.ui.context import UIContext

CANARY = "hf_CanaryTokenDoNotLeak1234567890"
RUN = "pg-test"
PROMPTS = ["Calculate the ROI for a cost of $7,500 and a final value of $19,500.",
           "What is the simple interest on $1,000 at 5% per year for 3 years?",
           "What is compound interest?"]
GREEDY = Sampling(max_new_tokens=24, temperature=0.0, seed=0)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A studio home holding one finished run (8 steps, checkpoints at 4 and 8)."""
    path = tmp_path_factory.mktemp("pg_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_HOME", str(path))
        cfg = load_preset("tiny-demo").replace({"train.max_steps": 8, "train.save_steps": 4, "train.eval_steps": 4,
                                                "train.sample_prompts": 0})
        run = RunStore().create(cfg, RUN)
        assert Recipe(run).execute() == "completed"
        yield path


@pytest.fixture(autouse=True)
def same_home(home, studio_home, monkeypatch):
    # conftest gives each test a fresh home; these tests share the one holding the trained run.
    monkeypatch.setenv("STUDIO_HOME", str(home))


@pytest.fixture(scope="module")
def ctx(home):
    return UIContext(store=RunStore(home / "runs"))


@pytest.fixture(scope="module")
def loaded(ctx, home):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_HOME", str(home))
        status, dropdown = playground.load(ctx.holder, ctx.store, RUN, ["checkpoint-4", "checkpoint-8"])
    assert "Loaded" in status, status
    return dropdown


def last(gen):
    out = None
    for out in gen:
        pass
    return out


def test_run_choices_and_defaults(ctx):
    assert [v for _, v in run_picker.run_choices(ctx.store, run_picker.has_weights)] == [RUN]
    names, chosen, prompts = playground.run_defaults(ctx.store, RUN)
    assert names == ["checkpoint-4", "checkpoint-8"] and chosen == names
    lines = prompts.splitlines()
    assert len(lines) == 3 and all(lines)


def test_load_errors_are_messages(ctx):
    holder = engine.ModelHolder()
    status, _ = playground.load(holder, ctx.store, "no-such-run", [])
    assert "Could not load" in status and "no run named 'no-such-run'" in status
    status, _ = playground.load(holder, ctx.store, "../etc", [])
    assert "Could not load" in status and "not allowed" in status
    assert playground.load(holder, ctx.store, None, [])[0] == "Choose a run first."
    with pytest.warns(UserWarning, match="load a run first"):
        assert last(playground.generate(holder, "hi", "final", GREEDY)) == (gr.skip(), gr.skip())


def test_load_and_generate_side_by_side(ctx, loaded):
    assert loaded.choices and [v for _, v in loaded.choices] == ["final", "ckpt-4", "ckpt-8"]
    assert loaded.value == "final"
    pairs = []
    for p in PROMPTS:
        steps = list(playground.generate(ctx.holder, p, "final", GREEDY))
        base, tuned = steps[-1]
        assert isinstance(base, str) and isinstance(tuned, str) and base and tuned
        assert len(steps) > 2  # streamed: the answers grew over several yields
        assert steps[0][1] == ""  # the base streams first, the tuned answer after it
        pairs.append((base, tuned))
    assert any(b != t for b, t in pairs), pairs  # the adapter was trained: it changes answers


def test_compare_table_has_a_column_per_adapter(ctx, loaded):
    tables = list(playground.compare(ctx.holder, "\n".join(PROMPTS[:2]) + "\n\n", GREEDY))
    assert len(tables) == 2  # one row at a time
    table = tables[-1]
    assert table["headers"] == ["prompt", "base", "final", "ckpt-4", "ckpt-8"]
    assert [r[0] for r in table["data"]] == PROMPTS[:2]
    assert all(isinstance(c, str) for r in table["data"] for c in r)
    with pytest.warns(UserWarning, match="at least one prompt"):
        assert last(playground.compare(ctx.holder, "  \n", GREEDY))["data"] == []


def test_compare_columns_share_the_table_however_many_models():
    for n in (2, 4, 8):
        widths = [float(w.rstrip("%")) for w in playground.compare_widths(n)]
        assert len(widths) == n + 1 and abs(sum(widths) - 100) < 0.1 and widths[0] >= 16
    table = playground.compare_table({"headers": ["prompt", "base", "final", "ckpt-2"], "data": []})
    assert table.column_widths == playground.compare_widths(3)


def test_blind_ab_vote_saves_pair_and_counts(ctx, loaded, home):
    prefs = home / "preferences.jsonl"
    before = engine.tally()
    steps = list(playground.blind_pair(ctx.holder, PROMPTS[0], "final", GREEDY, rng=random.Random(3)))
    assert all(s[2] is None for s in steps[:-1])  # no mapping until both answers are complete
    a, b, mapping = steps[-1]
    assert {mapping["A"]["who"], mapping["B"]["who"]} == {"base", "tuned"}
    assert (mapping["A"]["text"], mapping["B"]["text"]) == (a, b)

    session = {"tuned": 0, "base": 0, "tie": 0}
    tally, status, left, session = playground.vote("A", mapping, session)
    winner = mapping["A"]["who"]
    assert left is None and session[winner] == 1 and "Saved" in status
    rec = json.loads(prefs.read_text().splitlines()[-1])
    assert rec == {"prompt": PROMPTS[0], "chosen": a, "rejected": b, "winner": winner, "run": RUN, "adapter": "final"}
    after = engine.tally()
    assert after[winner] == before[winner] + 1 and after["total"] == before["total"] + 1
    assert f"{winner} 1" in tally

    lines = len(prefs.read_text().splitlines())
    tally, status, _, session = playground.vote("tie", mapping, session)
    assert session["tie"] == 1 and "tie 1" in tally and len(prefs.read_text().splitlines()) == lines
    assert playground.vote("A", None, session)[1] == "Generate a blind pair first."


def test_evaluate_shows_base_and_tuned(ctx):
    assert evaluate.show_saved(ctx.store, RUN)[0].endswith("has not been evaluated yet.")
    assert evaluate.results_visible(evaluate.show_saved(ctx.store, RUN)[1]) == "hidden"  # no empty tables
    status, table, best, worst = evaluate.evaluate(ctx.store, RUN, 4, 12)
    assert status.startswith("Evaluated"), status
    assert evaluate.results_visible(table) is True
    assert table["headers"] == ["metric", "base", "tuned"]
    assert [r[0] for r in table["data"]] == ["loss", "perplexity", "exact match", "ROUGE-L F1"]
    assert all(isinstance(r[1], float) and isinstance(r[2], float) for r in table["data"])
    assert best["headers"][:4] == ["prompt", "reference", "base", "tuned"] and 1 <= len(best["data"]) <= 3
    saved = evaluate.show_saved(ctx.store, RUN)  # a reload shows the same numbers from evaluation.json
    assert saved[0].startswith("Saved evaluation") and saved[1] == table
    assert "Choose" in evaluate.evaluate(ctx.store, None, 4, 12)[0]


def test_zip_merge_and_snippet(ctx):
    path, status = export.make_zip(ctx.store, RUN)
    with zipfile.ZipFile(path) as z:
        assert f"{RUN}-adapter/adapter_model.safetensors" in z.namelist()
    assert "zipped" in status
    assert export.make_zip(ctx.store, None) == (None, "**Could not zip:** choose a finished run first.")
    assert "PeftModel.from_pretrained" in export.snippet(ctx.store, RUN, False)
    assert export.snippet(ctx.store, RUN, True).startswith("# no merged model yet")
    status, code = export.merge(ctx.store, RUN)
    assert "merged" in status.lower() and (ctx.store.get(RUN).dir / "merged" / "model.safetensors").exists()
    assert "AutoModelForCausalLM.from_pretrained" in code and "PeftModel" not in code


def test_push_offline_or_without_token_never_leaks(ctx, monkeypatch, caplog):
    typed = "hf_TypedSecretValue0987654321"
    outputs = [export.push(ctx.store, RUN, "me/demo", True, False, ""),  # falls back to HF_TOKEN; offline
               export.push(ctx.store, RUN, "me/demo", True, False, typed),
               export.push(ctx.store, RUN, "nodash", True, False, typed)]
    monkeypatch.delenv("HF_TOKEN")
    outputs.append(export.push(ctx.store, RUN, "me/demo", True, False, None))
    status = [s for s, _ in outputs]
    assert all(cleared == "" for _, cleared in outputs)  # the token box is emptied after every push
    assert status[0].startswith("**Could not push:** push to me/demo failed") and "offline" in status[0].lower()
    assert "owner/name" in status[2]
    assert status[3] == "**Could not push:** no Hub token: set HF_TOKEN or enter a token with write access."
    seen = " ".join(status) + caplog.text
    assert CANARY not in seen and typed not in seen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_tabs_through_gradio_client(ctx, home, caplog):
    from gradio_client import Client

    # Its own model holder: /load below keeps only checkpoint-8, which must not change what the shared holder
    # (the ``loaded`` fixture's, all checkpoints) holds for the tests that run after this one in any order.
    ctx = UIContext(store=ctx.store)
    with gr.Blocks() as demo:
        with gr.Tab("Playground"):
            pg = playground.build(ctx)
        with gr.Tab("Evaluate"):
            evaluate.build(ctx)
        with gr.Tab("Export"):
            export.build(ctx)
    assert isinstance(pg, playground.PlaygroundUI) and pg.run.value == RUN
    demo.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                        allowed_paths=[str(home / "runs")], show_error=False, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        status, adapter = client.predict(RUN, ["checkpoint-8"], api_name="/load")
        assert "Loaded" in status and adapter["value"] == "final"  # a dropdown update: choices and value
        base, tuned = client.predict(PROMPTS[0], "final", 24, 0.0, 1.0, 1.0, 0, api_name="/generate")
        assert isinstance(base, str) and isinstance(tuned, str) and base and tuned

        table = client.predict("\n".join(PROMPTS[:1]), 16, 0.0, 1.0, 1.0, 0, api_name="/compare")
        assert table["headers"] == ["prompt", "base", "final", "ckpt-8"]

        before = engine.tally()["total"]
        a, b = client.predict(PROMPTS[1], "final", 16, 0.0, 1.0, 1.0, 0, api_name="/ab")  # mapping stays server-side
        assert a and b
        tally, vote_status = client.predict("B", api_name="/vote")
        assert "Saved" in vote_status and engine.tally()["total"] == before + 1

        zip_file, zip_status = client.predict(RUN, api_name="/zip")
        with zipfile.ZipFile(zip_file) as z:
            assert any(n.endswith("adapter_model.safetensors") for n in z.namelist())

        # The results column shown or hidden beside the tables is not part of the API's answer.
        ev_status, ev_table, _, _ = client.predict(None, 4, 12, api_name="/evaluate")
        assert ev_status == "Choose a finished run." and ev_table["data"] == []

        push_status, token_box = client.predict(RUN, "me/demo", True, False, "", api_name="/push")
        assert push_status.startswith("**Could not push:**") and token_box == ""
        outputs = json.dumps([status, base, tuned, table, a, b, tally, vote_status, zip_status, push_status])
        assert CANARY not in outputs
    finally:
        demo.close()
    assert CANARY not in caplog.text
    # Nothing the studio wrote (events, configs, zips, preferences) holds the token.
    for p in home.rglob("*"):
        if p.is_file() and p.suffix in {".jsonl", ".json", ".yaml", ".log", ".md", ".txt", ".zip"}:
            assert CANARY.encode() not in p.read_bytes(), p


# ---- the chat ------------------------------------------------------------------------------------

def test_chat_is_multi_turn_per_side_and_renders_the_whole_conversation(ctx, loaded):
    holder = ctx.holder
    steps = list(playground.chat_turn(holder, PROMPTS[0], [], [], "base", "final", GREEDY))
    left, right, box = steps[-1]
    assert box == "" and len(steps) > 2  # streamed: the answers grow over several yields
    assert [m["role"] for m in left] == ["user", "assistant"] and left[1]["content"] and right[1]["content"]
    assert left[1]["content"] != right[1]["content"]  # base and tuned differ on a training prompt
    # Second turn: each side's prompt holds its own earlier answer, in the run's (alpaca) template.
    prompt = holder.render_chat(right, PROMPTS[1])
    assert prompt.startswith(f"### Instruction:\n{PROMPTS[0]}\n\n### Response:\n{right[1]['content']}")
    assert prompt.endswith(f"### Instruction:\n{PROMPTS[1]}\n\n### Response:\n")
    assert holder.tokenizer.eos_token in prompt  # the earlier turn ends as training ends an example
    left2, right2, _ = last(playground.chat_turn(holder, PROMPTS[1], left, right, "base", "ckpt-8", GREEDY))
    assert [m["role"] for m in right2] == ["user", "assistant"] * 2 and right2[:2] == right
    # Regenerate answers the last message again (a new seed), keeping the turns.
    *_, (lh, rh, _, count) = playground.regenerate(holder, left2, right2, "base", "ckpt-8", GREEDY, 0)
    assert count == 1 and len(rh) == 4 and rh[2]["content"] == PROMPTS[1]


def test_chat_refuses_without_a_message_or_a_model(ctx, loaded):
    with pytest.warns(UserWarning, match="type a message"):
        assert last(playground.chat_turn(ctx.holder, "  ", [], [], "base", "final", GREEDY)) == (gr.skip(),) * 3
    with pytest.warns(UserWarning, match="not loaded"):
        last(playground.chat_turn(ctx.holder, "hi", [], [], "base", "ckpt-99", GREEDY))
    # Gradio sends message content as parts: they read back as plain text.
    assert playground.plain([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]) == \
        [{"role": "user", "content": "hi"}]


def test_blind_conversation_votes_carry_the_rendered_conversation(ctx, loaded, home):
    prefs = home / "preferences.jsonl"
    rng = random.Random(5)
    a, b, box, mapping = last(playground.blind_turn(ctx.holder, PROMPTS[0], [], "final", GREEDY, rng=rng))
    assert mapping["turn"] == 1 and a[-1]["content"] == mapping["A"]["text"] and b[-1]["content"] == mapping["B"]["text"]
    session = {"tuned": 0, "base": 0, "tie": 0}
    history = playground.continue_with(mapping, "B")[0]
    _, status, left, session = playground.vote("B", mapping, session)
    assert left is None and "Saved" in status
    first = json.loads(prefs.read_text().splitlines()[-1])
    assert first["prompt"] == ctx.holder.render_chat([], PROMPTS[0]) and first["turn"] == 1
    assert first["chosen"] == mapping["B"]["text"] and first["rejected"] == mapping["A"]["text"]
    # Turn two continues from the chosen answer; its prompt is the whole conversation so far.
    assert history[-1] == {"role": "assistant", "content": mapping["B"]["text"]}
    *_, mapping2 = last(playground.blind_turn(ctx.holder, PROMPTS[2], history, "final", GREEDY, rng=rng))
    playground.vote("A", mapping2, session)
    second = json.loads(prefs.read_text().splitlines()[-1])
    assert second["turn"] == 2 and second["prompt"] == ctx.holder.render_chat(history, PROMPTS[2])
    assert PROMPTS[0] in second["prompt"] and mapping["B"]["text"] in second["prompt"]
    assert second["messages"][-1] == {"role": "user", "content": PROMPTS[2]}
    download = playground.votes_file()
    assert open(download, encoding="utf-8").read() == prefs.read_text(encoding="utf-8")
    assert str(prefs) in playground.votes_note()


def test_compare_prompts_carry_their_input(ctx, loaded):
    line = f"Calculate the break-even point in units.{playground.INPUT_MARK}Fixed costs: $1,000; price $10."
    assert playground.split_input(line) == ("Calculate the break-even point in units.", "Fixed costs: $1,000; price $10.")
    table = last(playground.compare(ctx.holder, line, GREEDY))
    assert table["data"][0][0] == "Calculate the break-even point in units.\n\nFixed costs: $1,000; price $10."
    assert evaluate.whole_prompt({"prompt": "Do it.", "input": "the data"}) == "Do it.\n\nthe data"


def test_export_snippet_names_the_demo_base_by_its_folder(ctx):
    from studio.modeling import resolve_base

    code = export.snippet(ctx.store, RUN, False)
    assert f'from_pretrained("{resolve_base("studio-tiny-mistral")}")' in code and '"studio-tiny-mistral"' not in code
