"""The draft and the pre-Start summary as plain functions, and the smaller layout promises (number boxes that
take any keystroke, short help, the length axis, byte-level tokens, the fit table's machine line, the quiet
bitsandbytes import).  The browser side is in test_e2e_state.py."""

from __future__ import annotations

import json
import logging

import gradio as gr

from conftest import CANARY, SAMPLES
from studio import drafts
from studio.presets import load_preset
from studio.ui import data, presets, state
from studio.ui.widgets import bounded_info, short_help, widget

KEYS = list(presets.KEYS) + ["data.path", "data.val_samples", "data.mapping", "data.template"]


def _values(cfg, **changes):
    vals = presets.values_of(cfg) + [str(SAMPLES / "finance_alpaca.jsonl"), cfg.data.val_samples, {}, "alpaca"]
    for k, v in changes.items():
        vals[KEYS.index(k.replace("__", "."))] = v
    return vals


def test_a_draft_keeps_only_what_differs_and_round_trips(studio_home):
    cfg = load_preset("tiny-demo")
    vals = _values(cfg, train__max_steps=6, data__template="qa")
    d = state.draft_of("tiny-demo", cfg.to_dict(), KEYS, vals)
    assert d.values == {"train.max_steps": 6, "data.path": str(SAMPLES / "finance_alpaca.jsonl"), "data.template": "qa"}
    drafts.save(d)
    back = drafts.load()
    assert back.preset == "tiny-demo" and back.values == d.values and back.base == d.base
    assert state.restore_values(back, KEYS) == vals
    assert back.config().train.max_steps == 6 and back.config().data.template == "qa"


def test_a_half_typed_value_is_kept_as_typed_and_start_names_the_key(studio_home):
    cfg = load_preset("tiny-demo")
    vals = _values(cfg, train__learning_rate=0)  # "0" on the way to 0.003
    d = state.draft_of("tiny-demo", cfg.to_dict(), KEYS, vals)
    drafts.save(d)
    assert drafts.load().values["train.learning_rate"] == 0
    text = state.summary("tiny-demo", cfg.to_dict(), KEYS, vals)
    assert "Start would refuse" in text and "train.learning_rate" in text


def test_two_pages_editing_different_fields_both_keep_their_edit(studio_home):
    """Page A and page B took on the same draft; A saves max steps, then B (behind, still typing) saves its
    template: B's edit goes on top of A's, B is left behind so its next tick takes the merged draft on."""
    cfg = load_preset("tiny-demo")
    first = state.draft_of("tiny-demo", cfg.to_dict(), KEYS, _values(cfg))
    assert state.keep_draft({}, first) == {} and drafts.load() is None  # not restored yet: saves nothing
    shown_a = state.keep_draft({"stamp": "", "page": "page-a"}, first)
    shown_b = {"stamp": drafts.stamp(), "body": drafts.as_dict(first), "page": "page-b"}
    assert shown_a["stamp"] == shown_b["stamp"] and shown_a["body"] == shown_b["body"]
    assert drafts.load().by == shown_a["page"] != "page-b"  # who saved it: a page never takes on its own save
    shown_a = state.keep_draft(shown_a, state.draft_of("tiny-demo", cfg.to_dict(), KEYS,
                                                         _values(cfg, train__max_steps=9)))
    assert shown_a["stamp"] == drafts.stamp() != shown_b["stamp"]
    assert state.follows(shown_b["stamp"], drafts.stamp(), editing=False)
    assert not state.follows(shown_b["stamp"], drafts.stamp(), editing=True)  # typing: taken on after
    assert not state.follows(shown_a["stamp"], drafts.stamp(), editing=False)  # its own save
    shown_b = state.keep_draft(shown_b, state.draft_of("tiny-demo", cfg.to_dict(), KEYS,
                                                         _values(cfg, data__template="qa")))
    on_disk = drafts.load().values
    assert on_disk["train.max_steps"] == 9 and on_disk["data.template"] == "qa"
    assert state.follows(shown_b["stamp"], drafts.stamp(), editing=False)  # B shows 0 steps: it takes 9 on
    # Taking it on sends the widgets' values back: the same draft, nothing written, so pages never ping-pong.
    assert drafts.load().by == ""  # merged: nobody's, so both pages take it on
    before = drafts.stamp()
    taken = state.taken_on(drafts.load(), before, shown_b)
    again = state.keep_draft(taken, state.draft_of("tiny-demo", cfg.to_dict(), KEYS,
                                                   _values(cfg, train__max_steps=9, data__template="qa")))
    assert drafts.stamp() == before == again["stamp"]
    # Setting a field back to the preset's value on a page behind removes it from the merged draft too.
    merged = drafts.merge(drafts.load(), drafts.from_dict(taken["body"]),
                          state.draft_of("tiny-demo", cfg.to_dict(), KEYS, _values(cfg, data__template="qa")))
    assert "train.max_steps" not in merged.values and merged.values["data.template"] == "qa"
    # Another preset chosen replaces the draft as a whole.
    other = drafts.Draft("mine", {**cfg.to_dict(), "name": "mine"}, {})
    assert drafts.merge(drafts.load(), drafts.from_dict(taken["body"]), other) is other


def test_saving_a_preset_on_a_page_behind_keeps_the_saved_base(studio_home):
    """"Save preset" names the preset first and changes the base after: the page's second save carries the label
    it already saved with a new base.  Behind another page's draft, that base is kept, not the other's, and the
    values are measured from it, so neither page shows the saved preset with changes it does not have."""
    loaded = load_preset("tiny-demo").replace({"train.learning_rate": 0.0007})
    saved = loaded.replace({"train.max_steps": 4})
    named = drafts.Draft("my-short", loaded.to_dict(), {"train.max_steps": 4})  # after "save": the label
    theirs = drafts.Draft("my-short", loaded.to_dict(), {"train.max_steps": 4, "data.template": "qa"})
    adopted = state.draft_of("my-short", saved.to_dict(), KEYS, _values(saved))  # after "adopt": the base
    assert adopted.values.get("train.max_steps") is None
    merged = drafts.merge(theirs, named, adopted)
    assert merged is adopted and merged.config().train.max_steps == 4


def test_values_read_before_the_page_drew_a_draft_it_took_on_are_stale():
    """A take moves the server's side of the page at once (its version, the preset's base) and the widgets only
    once the page has drawn them; the page's token, moved after the drawing, tells the values apart."""
    shown = state.taken_on(drafts.Draft("tiny-demo", {}, {}), "1:2:3", {"page": "page-a", "took": 1})
    assert shown["took"] == 2 and shown["page"] == "page-a"
    assert state.stale(shown, 1)  # read with the token of the draft before: not an edit
    assert not state.stale(shown, 2)
    assert not state.stale({}, 0) and not state.stale({"page": "p"}, None)  # before the first take: no token yet


def test_a_torn_or_foreign_draft_is_ignored_and_no_token_is_written(studio_home):
    drafts.path().parent.mkdir(parents=True, exist_ok=True)
    drafts.path().write_text('{"version": 1, "base": {}, "val')
    assert drafts.load() is None
    drafts.path().write_text(json.dumps({"version": 99, "base": {}, "values": {}}))
    assert drafts.load() is None
    cfg = load_preset("tiny-demo")
    drafts.save(drafts.Draft("tiny-demo", cfg.to_dict(), {"output.hub_repo": f"me/{CANARY}"}))
    assert CANARY not in drafts.path().read_text()


def test_the_summary_says_what_start_would_train_on_and_what_would_refuse(studio_home):
    cfg = load_preset("tiny-demo")
    ok = state.summary("tiny-demo", cfg.to_dict(), KEYS, _values(cfg, train__max_steps=6))
    assert "Preset **tiny-demo** with 1 change: `train.max_steps` 0 → 6" in ok
    assert "finance_alpaca.jsonl" in ok and "Template **alpaca**" in ok and "columns as detected" in ok
    assert "**376** training and **24** validation examples" in ok
    assert "checks Start makes pass" in ok
    bad = state.summary("tiny-demo", cfg.to_dict(), KEYS,
                        _values(cfg, data__val_samples=1000, train__optimizer="paged_adamw_8bit"))
    assert "Start would refuse" in bad
    assert "data.val_samples: 1000 validation examples leave none" in bad
    assert "train.optimizer: paged_adamw_8bit needs a CUDA GPU" in bad
    mapped = state.summary("tiny-demo", cfg.to_dict(), KEYS,
                           _values(cfg, data__mapping={"instruction": "instruction", "response": "output"}))
    assert "instruction ← `instruction`" in mapped


def test_number_boxes_take_any_keystroke_and_show_their_range():
    box = widget("data.max_length", 512)
    assert isinstance(box, gr.Number) and box.minimum is None and box.maximum is None
    assert box.preprocess(4) == 4  # a first keystroke of 48 is not refused by Gradio
    assert "8 to 131,072" in box.info
    assert bounded_info("Peak learning rate.", 1e-8, 1.0) == "Peak learning rate. (1e-08 to 1)"
    assert short_help("One. Two, much longer.") == "One."
    assert len(short_help("word " * 60)) <= 110


def test_the_length_axis_is_not_stretched_by_one_outlier():
    lengths = [40 + i % 20 for i in range(400)] + [5000]
    fig = data.length_figure(lengths, 128)
    assert tuple(fig.layout.xaxis.range)[1] < 200
    assert any("1 longer example off the axis (longest 5000)" in a.text for a in fig.layout.annotations)
    assert data.axis_end([40, 50, 60], 128) is None  # nothing to cut


def test_byte_level_tokens_are_explained():
    assert "byte-level token" in data.byte_note([("caf", "loss"), ("\ufffd", "loss")])
    assert data.byte_note([("plain", "loss")]) == ""


def test_the_fit_panel_names_this_machine_and_the_estimate(studio_home):
    cfg = load_preset("tiny-demo")
    rows, verdict, plan_rows = presets.fit(cfg.to_dict(), *presets.values_of(cfg))
    assert [r[0] for r in plan_rows][:2] == ["micro-batch", "compute dtype"] and all(r[2] for r in plan_rows)
    assert verdict.startswith("**This machine: ")
    assert ("CPU only" in verdict) == (presets.this_machine().device == "cpu")
    assert rows[0][0].endswith("(this machine)")  # this machine is the table's first row, with its estimate
    assert len(presets.FIT_HEADERS) == 5 and all(isinstance(r[2], float) and r[2] > 0 for r in rows)


def test_choices_of_the_preset_list_are_read_afresh(studio_home):
    cfg = load_preset("tiny-demo")
    assert "later" not in presets.preset_choices()
    presets.save(cfg.to_dict(), "later", *presets.values_of(cfg))
    assert "later" in presets.preset_choices()
    label = presets.yaml_label("/tmp/x/colleague.yaml")
    assert (label, label) in presets.preset_choices(label)
    assert presets.choose_preset(label)[-1] == ""  # choosing the file's entry again changes nothing


def test_bitsandbytes_optional_kernel_warning_is_dropped(caplog):
    import studio  # noqa: F401 - installs the filter

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module")
        log.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def _checkpoint(run, step):
    ck = run.checkpoints_dir / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text("{}")
    (ck / "adapter_model.safetensors").write_bytes(b"")
    return ck


def test_run_lists_follow_the_folder_and_stay_put_while_nothing_changes(studio_home):
    import shutil

    from studio.runs import RunStore
    from studio.ui.run_picker import has_weights

    store = RunStore(studio_home / "runs")
    store.root.mkdir(parents=True, exist_ok=True)
    pickers = [("pg", has_weights)]
    upd, shown = state.run_list_updates(store, pickers, [None], None)
    assert upd.choices == [] and shown == {"pg": []}
    assert state.run_list_updates(store, pickers, [None], shown)[0] == gr.skip()  # nothing redrawn
    run = store.create(load_preset("tiny-demo"), "later")
    _checkpoint(run, 2)
    upd, shown = state.run_list_updates(store, pickers, [None], shown)
    assert upd.value == "later" and [c[1] for c in upd.choices] == ["later"]
    # The Playground's checkpoints: a deleted one leaves the list and the selection.
    _checkpoint(run, 4)
    ck, names = state.checkpoint_update(store, "later", ["checkpoint-2", "checkpoint-4"], None)
    assert names == ["checkpoint-2", "checkpoint-4"]
    assert state.checkpoint_update(store, "later", ["checkpoint-4"], names)[0] == gr.skip()
    shutil.rmtree(run.checkpoints_dir / "checkpoint-4")
    ck, names = state.checkpoint_update(store, "later", ["checkpoint-2", "checkpoint-4"], names)
    assert names == ["checkpoint-2"] and ck.value == ["checkpoint-2"] and ck.choices == [("checkpoint-2", "checkpoint-2")]
