"""The Data and Presets tabs: their event handlers on the real engine, and both API endpoints served."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest

from conftest import SAMPLES
from studio.config import RunConfig
from studio.presets import list_presets, load_preset
from studio.ui import data, presets
from studio.ui.context import UIContext
from studio.ui.widgets import to_config

TINY = "studio-tiny-mistral"
ALPACA = str(SAMPLES / "finance_alpaca.jsonl")


def roles_for(path: str) -> list[str]:
    """The role dropdown values load_source proposes for a file."""
    _, *updates = data.load_source(path)
    return [u["value"] for u in updates[:5]]


def run_preview(path: str, roles=None, template="alpaca", prompt="", response="{response}", max_length=128,
                train_on_inputs=False, model=TINY, n=2):
    return data.refresh(path, "", "", "train", *(roles if roles is not None else roles_for(path)), template,
                        prompt, response, max_length, train_on_inputs, model, n)


def uploaded(tmp_path, name: str, text: str) -> str:
    f = tmp_path / name
    f.write_text(text)
    path, _, note, sample = data.on_upload(str(f), ALPACA)
    assert path != ALPACA and sample is None, note  # the sample dropdown no longer names the data
    return path


def classes(pieces) -> set:
    return {c for _, c in pieces if c}


def masked_text(pieces) -> str:
    return "".join(t for t, c in pieces if c == data.MASKED)


# ---- Data tab -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(data.sample_files()))
def test_preview_of_every_sample_highlights_loss_and_masked_tokens(name, tiny_model_dir):
    pieces, rows, fig, summary, status = run_preview(str(SAMPLES / name))
    assert status.startswith("✅"), status
    assert classes(pieces) == {data.LOSS, data.MASKED}
    assert len(rows) == 2
    for _, n_tokens, loss_tokens, truncated in rows:
        assert 0 < loss_tokens < n_tokens and truncated == "no"
    assert "None exceed the max length of 128" in summary


def test_histogram_draws_the_max_length_and_truncation_sentence_follows_it(tiny_model_dir):
    _, _, fig, summary, _ = run_preview(ALPACA, max_length=128)
    assert [s.x0 for s in fig.layout.shapes] == [128]
    assert "None exceed" in summary
    _, rows, fig, lower, _ = run_preview(ALPACA, max_length=40)
    assert [s.x0 for s in fig.layout.shapes] == [40]
    assert "will be truncated" in lower and "max length of 40" in lower
    assert len(fig.data[0].x) == 400  # full, untruncated lengths of every example
    assert max(fig.data[0].x) > 40
    assert any(r[3] == "yes" for r in rows)


def test_malformed_jsonl_upload_names_the_line(tmp_path, studio_home, tiny_model_dir):
    bad = tmp_path / "my data (1).jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    path, hub, note, sample = data.on_upload(str(bad), ALPACA)
    assert path.startswith(str(studio_home / "uploads")) and path.endswith(".jsonl")
    assert "my_data_1-" in path and hub == "" and sample is None
    schema, *_ = data.load_source(path)
    assert "line 2" in schema
    *_, status = run_preview(path, roles=["instruction", "", "output", "", ""])
    assert status.startswith("⚠️") and "line 2" in status and "not valid JSON" in status
    # Same bytes, same stable path; a file type the engine cannot read is refused and the data is kept.
    assert data.on_upload(str(bad), ALPACA)[0] == path
    exe = tmp_path / "model.bin"
    exe.write_bytes(b"\x00\x01")
    kept, _, note, sample = data.on_upload(str(exe), ALPACA)
    assert kept == ALPACA and "Upload refused" in note and ".bin" in note
    assert sample == gr.update()  # the sample still in use stays chosen


def test_skipped_records_are_summarised(tmp_path, tiny_model_dir):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(4)]
    rows[2]["output"] = ""
    *_, status = run_preview(uploaded(tmp_path, "some.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert status.startswith("✅") and "1 of 4 records skipped" in status
    assert "some-3cf41d339b.jsonl line 3" in status and "'output' is empty" in status


def test_only_samples_and_uploads_are_read(tmp_path):
    secret = tmp_path / "secrets.json"
    secret.write_text('[{"instruction": "token", "output": "hf_secret"}]')
    for path in (str(secret), str(SAMPLES / ".." / ".." / "secrets.json"), "/etc/passwd"):
        pieces, *_, status = run_preview(path, roles=["instruction", "", "output", "", ""])
        assert pieces == [] and "reads only its samples and uploaded files" in status
    assert "reads only" in data.load_source(str(secret))[0]
    assert run_preview("samples/finance_alpaca.jsonl", model="x/none")[-1].startswith("⚠️ The tokenizer")


def test_mapping_override_changes_the_preview(tiny_model_dir):
    detected = roles_for(ALPACA)
    assert detected == ["instruction", "input", "output", "", ""]
    pieces, *_ = run_preview(ALPACA, roles=detected)
    swapped = ["output", "input", "instruction", "", ""]
    pieces2, *_, status = run_preview(ALPACA, roles=swapped)
    assert status.startswith("✅")
    assert masked_text(pieces) != masked_text(pieces2)
    assert "The profit margin is 54.75%." in masked_text(pieces2)  # the answer is now in the prompt
    det = dict(zip(data.ROLE_ORDER, detected))
    assert data.mapping_state(det, *detected) == {}  # as detected: the config keeps the empty default
    assert data.mapping_state(det, *swapped) == {"instruction": "output", "input": "input",
                                                 "response": "instruction"}


def test_unknown_columns_are_named_and_can_be_mapped(tmp_path, tiny_model_dir):
    f = uploaded(tmp_path, "qa.csv", "q,a\nWhat is ROI?,Return on investment.\nWhat is EPS?,Earnings per share.\n")
    schema, *_ = data.load_source(f)
    assert "Columns found: 'q', 'a'" in schema
    *_, status = run_preview(f)
    assert status.startswith("⚠️") and "map 'instruction' and 'response'" in status
    pieces, *_, status = run_preview(f, roles=["q", "", "a", "", ""])
    assert status.startswith("✅") and "What is ROI?" in masked_text(pieces)


def test_a_role_from_the_previous_file_is_named_not_an_error(tmp_path, tiny_model_dir):
    """A new source sets the role choices on the server at once; an event the page sent just before carries the
    old file's column.  Gradio's check of the choices would fail that event (an "Error" toast: CI saw it after an
    upload); the role dropdowns pass it on, and the preview names the column the new file lacks."""
    _, _, data_ui, _ = build_both()
    f = uploaded(tmp_path, "notes.jsonl", json.dumps({"instruction": "Price?", "output": "Two."}) + "\n")
    _, *updates = data.load_source(f)
    assert [c for _, c in updates[1]["choices"]] == ["", "instruction", "output"]
    box = data_ui.role_dropdowns["input"]
    assert box.get_block_name() == "dropdown" and not box.allow_custom_value  # drawn as Gradio's, nothing typed
    session_copy = type(box)(**{**box.constructor_args, "choices": updates[1]["choices"], "value": ""})
    assert session_copy.preprocess("input") == "input"  # the alpaca sample's column, sent before the update
    assert session_copy.preprocess("output") == "output" and session_copy.preprocess(None) is None
    *_, status = run_preview(f, roles=["instruction", "input", "output", "", ""])
    assert "column 'input' for role 'input' is not in the data" in status and "instruction, output" in status


def test_importing_the_data_tab_writes_no_file_beside_the_code():
    """Gradio writes a ``.pyi`` beside the module of each component class it sees when none matches: the one for
    ``ColumnDropdown`` is kept in the repository, so a fresh import finds it as Gradio writes it and writes nothing."""
    ui = Path(data.__file__).parent
    kept = (ui / "column_dropdown.pyi").read_bytes()
    subprocess.run([sys.executable, "-c", "import studio.ui.data"], check=True, cwd=ui.parent.parent)
    assert sorted(p.name for p in ui.glob("*.pyi")) == ["column_dropdown.pyi"]
    assert (ui / "column_dropdown.pyi").read_bytes() == kept


def test_custom_template_starts_from_a_working_prompt(tiny_model_dir):
    text, prompt_upd, response_upd = data.template_changed("custom", "", "{response}")
    assert prompt_upd["visible"] and "{instruction}" in prompt_upd["value"]
    assert text == prompt_upd["value"] + "{response}"
    pieces, *_, status = run_preview(ALPACA, template="custom", prompt="Q: {instruction}\nA: ")
    assert status.startswith("✅") and masked_text(pieces).startswith("<s>Q:")
    *_, status = run_preview(ALPACA, template="custom", prompt="Q: {question}\nA: ")
    assert "unknown placeholder {question}" in status
    assert not data.template_changed("qa", "", "{response}")[1]["visible"]


def test_a_tokenizer_that_cannot_load_offline_is_said_and_text_is_still_shown():
    pieces, rows, fig, _, status = run_preview(ALPACA, model="no-such-owner/no-such-model")
    assert status.startswith("⚠️") and "could not be loaded" in status and "no-such-owner/no-such-model" in status
    assert fig is None and rows == []
    assert classes(pieces) == {data.LOSS, data.MASKED}
    *_, status = run_preview(ALPACA, template="chat", model="no-such-owner/no-such-model")
    assert "chat template needs the model's tokenizer" in status


def test_hub_dataset_failure_shows_the_engine_message():
    path, sample, note = data.use_hub("nobody/no-such-dataset", "", "train")
    assert path == "" and sample is None and "nobody/no-such-dataset" in note
    schema, *_ = data.load_source("", "nobody/no-such-dataset", "", "train")
    assert "could not be loaded" in schema and "internet" in schema
    assert "Type a dataset id" in data.use_hub("", "", "train")[2]


# ---- Presets tab --------------------------------------------------------------------------------

def test_preset_switch_fills_widgets_and_changes_list_the_key():
    base, desc, *values, status = presets.choose_preset("mistral-7b-finance-fast")
    v = dict(zip(presets.KEYS, values))
    assert v["model.base_model"] == "mistralai/Mistral-7B-v0.1" and v["lora.r"] == 8
    assert v["lora.target_modules"] == "q_proj, v_proj" and v["train.optimizer"] == "paged_adamw_8bit"
    assert "mistral-7b-finance-fast" in desc and base["data"]["hub_dataset"] == "Josephgflowers/Finance-Instruct-500k"
    assert presets.changes(base, *values).startswith("No changes")
    values[presets.KEYS.index("lora.r")] = 16
    values[presets.KEYS.index("lora.target_modules")] = "q_proj,v_proj"  # same list, written differently
    diff = presets.changes(base, *values)
    assert "1 changed" in diff and "`lora.r`: 8 → 16" in diff
    # Numbers read as people write them: no trailing ".0", small rates in short exponent form.
    values[presets.KEYS.index("train.epochs")] = 3
    values[presets.KEYS.index("train.learning_rate")] = 5e-5
    values[presets.KEYS.index("model.compute_dtype")] = "bf16"
    diff = presets.changes(base, *values)
    assert "`train.epochs`: 1 → 3" in diff and "`train.learning_rate`: 0.0002 → 5e-05" in diff
    assert "`model.compute_dtype`: 'fp16' → 'bf16'" in diff and ".0 →" not in diff
    values[presets.KEYS.index("output.run_name")] = "../escape"
    assert presets.changes(base, *values).startswith("⚠️ output.run_name")
    assert presets.choose_preset("no-such-preset")[-1].startswith("⚠️")


def test_save_preset_refuses_a_bad_name_and_lists_a_good_one():
    base, _, *values, _ = presets.choose_preset("tiny-demo")
    msg, upd = presets.save(base, "../evil", *values)
    assert msg.startswith("⚠️ preset name") and "not allowed" in msg and upd == gr.update()
    msg, _ = presets.save(base, "tiny-demo", *values)
    assert "shipped preset" in msg
    values[presets.KEYS.index("train.epochs")] = 2
    msg, upd = presets.save(base, "my-fast", *values)
    assert msg.startswith("Saved") and upd["value"] == "my-fast" and "my-fast" in upd["choices"]
    assert "my-fast" in list_presets() and load_preset("my-fast").train.epochs == 2


def test_loading_a_yaml_fills_widgets_or_names_the_problem(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("name: mine\nmodel:\n  base_model: studio-tiny-mistral\nlora:\n  r: 4\n")
    base, _, *values, status = presets.load_yaml(str(good))
    assert dict(zip(presets.KEYS, values))["lora.r"] == 4 and "mine.yaml" in status
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nlora:\n  r: [1,\n")
    assert "bad.yaml line" in presets.load_yaml(str(bad))[-1]
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("lora:\n  rank: 4\n")
    assert "lora.rank: " in presets.load_yaml(str(unknown))[-1]


def test_fit_panel_for_the_fast_preset_lists_this_machine_then_the_gpus():
    base, _, *values, _ = presets.choose_preset("mistral-7b-finance-fast")
    rows, verdict, plan_rows = presets.fit(base, *values)
    gpus = [r[0] for r in rows]
    assert gpus[0].endswith("(this machine)")
    assert gpus[1:] == ["T4 16 GB", "L4 24 GB", "A100 40 GB", "A100 80 GB", "H100 80 GB", "H200 141 GB"]
    assert all(r[3] == "yes" for r in rows[1:]) and "Fits on every GPU" in verdict
    assert [r[0] for r in plan_rows][:2] == ["micro-batch", "compute dtype"]
    big = dict(zip(presets.KEYS, values)) | {"train.batch_size": 256, "speed.micro_batch": 256,
                                             "speed.gradient_checkpointing": "off"}
    rows, verdict, _ = presets.fit(base, *[big[k] for k in presets.KEYS])
    assert rows[1][:2] == ["T4 16 GB", 15.0] and rows[1][3] == "no" and "speed.gradient_checkpointing" in rows[1][4]
    assert "not on T4 16 GB" in verdict or "none of these" in verdict


def test_fit_panel_shows_what_the_planner_runs_on_each_gpu():
    base, _, *values, _ = presets.choose_preset("mistral-7b-finance-fast")
    rows, verdict, _ = presets.fit(base, *values)
    by_gpu = {r[0]: r for r in rows}
    assert by_gpu["H100 80 GB"][4] == ("micro-batch 8 x 1, fp16, 16-bit weight cache, Liger kernels, CUDA graphs, "
                                       "fused LoRA, one optimizer update, graphed sample answers")
    assert "weight cache" not in by_gpu["T4 16 GB"][4] and "CUDA graphs" in by_gpu["T4 16 GB"][4]


def test_fit_says_when_the_shape_is_unknown_offline():
    base, _, *values, _ = presets.choose_preset("tiny-demo")
    values[presets.KEYS.index("model.base_model")] = "someone/unknown-model"
    rows, verdict, _ = presets.fit(base, *values)
    assert rows == [] and "unknown offline" in verdict


# ---- both tabs together -------------------------------------------------------------------------

def build_both():
    ctx = UIContext()
    with gr.Blocks() as demo:
        data_ui = data.build(ctx)
        presets_ui = presets.build(ctx)
        data.link_base_model(data_ui, presets_ui.base_model, presets_ui.base)
    return ctx, demo, data_ui, presets_ui


def test_default_values_make_the_tiny_demo_config_with_the_sample_path(tiny_model_dir):
    ctx, _, data_ui, presets_ui = build_both()
    assert data_ui.keys == [k for k in data_ui.keys if k.startswith("data.")] and len(data_ui.keys) == 15
    assert len(data_ui.keys) == len(data_ui.inputs) and len(presets_ui.keys) == len(presets_ui.inputs)
    values = [c.value for c in presets_ui.inputs + data_ui.inputs]
    cfg = to_config(RunConfig.from_dict(presets_ui.base.value), presets_ui.keys + data_ui.keys, values)
    expected = load_preset("tiny-demo").replace({"data.path": str(ctx.default_data)})
    assert cfg.to_dict() == expected.to_dict()
    # The demo works with no click: preview, histogram and fit are drawn at build time.
    assert data_ui.status.value.startswith("✅") and data_ui.histogram.value is not None
    assert "Fits on every GPU" in presets_ui.fit_verdict.value
    assert presets_ui.changes.value.startswith("No changes")
    # Compact file pickers: buttons, not drop zones hundreds of pixels tall.
    assert isinstance(presets_ui.yaml_upload, gr.UploadButton)
    assert presets_ui.yaml_upload.file_types == [".yaml", ".yml"]
    assert isinstance(data_ui.val_upload, gr.UploadButton)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_preview_and_estimate_endpoints(tiny_model_dir):
    from gradio_client import Client

    _, demo, data_ui, presets_ui = build_both()
    demo.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        pieces, counts, plot, summary, status = client.predict(
            ALPACA, "", "", "train", "instruction", "input", "output", "", "", "alpaca", "", "{response}", 40,
            False, TINY, 2, api_name="/preview")
        assert status.startswith("✅")
        assert {p["class_or_confidence"] for p in pieces} >= {data.LOSS, data.MASKED}
        assert len(counts["data"]) == 2 and "will be truncated" in summary
        params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/estimate"]["parameters"]
        assert [p["parameter_name"] for p in params] == [k.replace(".", "__") for k in presets_ui.keys]
        values = [c.value for c in presets_ui.inputs]
        values[presets_ui.keys.index("train.batch_size")] = 2
        table, verdict, plan = client.predict(*values, api_name="/estimate")
        assert [r[0] for r in table["data"]][1:6] == ["T4 16 GB", "L4 24 GB", "A100 40 GB", "A100 80 GB",
                                                      "H100 80 GB"]
        assert table["data"][0][0].endswith("(this machine)")
        assert "Fits on every GPU" in verdict and plan["data"][0][:2] == ["micro-batch", "2 x 1 accumulated"]
    finally:
        demo.close()
