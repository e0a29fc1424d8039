"""Bad input is refused early, with a message that names the place and the fix: data files, sizes,
hyperparameters, hardware contradictions and base models.

Fills the gaps left by test_data.py and test_config.py (which cover the first malformed line, BOM and
CRLF in JSONL, empty and binary .jsonl files, CSV newlines, wrong columns, empty fields and the batch
check inside ``prepare``).  Nothing here trains: rejections happen before any model weight loads, which
the run's events prove (no ``starting``/``running`` status).
"""

from __future__ import annotations

import json
import shutil
import tracemalloc

import pytest
from conftest import CANARY, SAMPLES

from studio.config import ConfigError, RunConfig
from studio.data.files import DataError, read_records
from studio.data.pipeline import prepare
from studio.hardware import Hardware
from studio.modeling import (
    ModelError,
    load_base,
    load_tokenizer,
    preflight,
    resolve_base,
)
from studio.presets import load_preset
from studio.runs import RunStore
from studio.training import Recipe

CPU = Hardware("cpu", "CPU", 16 * 2**30, 0, True)
T4 = Hardware("cuda", "T4", 16e9, 1, False)  # a GPU without bf16
GOOD = {"instruction": "What is ROI?", "output": "Return on investment."}


def _w(tmp_path, name, content):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8", newline="")
    return p


def _cpu_cfg(**overrides):
    """tiny-demo as the UI would start it, with dotted-key overrides."""
    return load_preset("tiny-demo").replace({"data.path": str(SAMPLES / "finance_alpaca.jsonl"), **overrides})


# ---- files ------------------------------------------------------------------------------------------

def test_malformed_line_number_is_exact_with_crlf_bom_and_blank_lines(tmp_path):
    lines = [json.dumps(GOOD)] * 56 + ['{"instruction": "broken", "output": "x"']
    # BOM, Windows line ends and blank lines must not shift the reported line number.
    text = "\ufeff" + "\r\n".join(lines[:10]) + "\r\n\r\n" + "\r\n".join(lines[10:]) + "\r\n"
    p = _w(tmp_path, "d.jsonl", text.encode("utf-8"))
    before = p.read_bytes()
    with pytest.raises(DataError, match=r"d\.jsonl line 58: not valid JSON .*fix that line or remove it"):
        read_records(p)
    assert p.read_bytes() == before  # the user's file is never rewritten


@pytest.mark.parametrize("name,content,match", [
    ("d.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]',
     r"d\.json line 3: not valid JSON"),
    ("d.json", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n',
     r"line 2: more than one JSON value; .*rename the file to \.jsonl"),
    ("d.jsonl", '[\n{"instruction": "a", "output": "b"}\n]\n', r"line 1: .*is this a JSON array\? rename the file to \.json"),
    ("d.jsonl", '[{"instruction": "a", "output": "b"}]\n', r"line 1: expected a JSON object \{\.\.\.\}, found list"),
    ("d.jsonl", '{"instruction": "a", "output": "b"}\n"just a string"\n', r"line 2: expected a JSON object"),
    ("d.json", "[]", "no examples found"),
    ("d.csv", "instruction,output\r\n", "no examples found"),
    ("d.csv", ",\n1,2\n", "first line must name the columns"),
    ("d.csv", "", "empty"),
    ("d.parquet", "", "empty"),
    ("d.parquet", "instruction,output\na,b\n", "not a readable Parquet file"),
    ("d.jsonl", "caf\xe9 au lait".encode("latin-1") + b"\n", r"line 1: not valid UTF-8 text; save the file as UTF-8"),
    ("d.yaml", "a: 1", "unsupported file type"),
])
def test_more_bad_files_name_the_place(tmp_path, name, content, match):
    with pytest.raises(DataError, match=match):
        read_records(_w(tmp_path, name, content))


@pytest.mark.parametrize("name", ["photo.csv", "archive.json", "photo.jsonl"])
def test_binary_files_renamed_to_any_text_type(tmp_path, name):
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8
    zip_ = b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(256)) * 8
    with pytest.raises(DataError, match="binary file .*upload a JSONL, JSON, CSV or Parquet file"):
        read_records(_w(tmp_path, name, zip_ if name.endswith(".json") else png))


def test_csv_with_bom_crlf_and_quoted_crlf_newlines(tmp_path):
    p = _w(tmp_path, "d.csv", b'\xef\xbb\xbfinstruction,output\r\n"first line\r\nsecond line","a, b"\r\nq2,a2\r\n')
    recs = read_records(p)
    # The BOM must not stick to the first column name, and a quoted CRLF is one newline.
    assert recs == [{"instruction": "first line\nsecond line", "output": "a, b"}, {"instruction": "q2", "output": "a2"}]


def test_json_array_with_bom_and_object_wrapper(tmp_path):
    p = _w(tmp_path, "d.json", b'\xef\xbb\xbf{"data": [{"prompt": "p", "completion": "c"}]}')
    assert read_records(p) == [{"prompt": "p", "completion": "c"}]


def test_mixed_schemas_and_missing_fields_in_one_file(tmp_path, tiny_tokenizer):
    rows = [GOOD] * 6 + [{"prompt": "p", "completion": "c"}, {"instruction": None, "output": "x"},
                         {"instruction": "q", "output": 42}, {"instruction": "q"}]
    p = _w(tmp_path, "mixed.jsonl", "\n".join(json.dumps(r) for r in rows))
    cfg = RunConfig.from_dict({"data": {"path": str(p)}, "train": {"batch_size": 2}})
    prep = prepare(cfg, tiny_tokenizer)
    assert len(prep.train) == 7  # six good rows and the number 42, read as the text "42"
    assert [s.split(":")[0] for s in prep.skipped] == ["mixed.jsonl line 7", "mixed.jsonl line 8",
                                                       "mixed.jsonl line 10"]
    assert "field 'instruction' is empty or missing" in prep.skipped[0]
    assert "field 'output' is empty or missing" in prep.skipped[2]


def test_wrong_column_names_refused_with_the_columns_found(tmp_path, tiny_tokenizer):
    p = _w(tmp_path, "d.jsonl", "\n".join(json.dumps({"q_text": "a", "reply": "b"}) for _ in range(8)))
    cfg = RunConfig.from_dict({"data": {"path": str(p)}, "train": {"batch_size": 2}})
    with pytest.raises(DataError, match="map 'instruction' and 'response'"):
        prepare(cfg, tiny_tokenizer)
    cfg = RunConfig.from_dict({"data": {"path": str(p), "mapping": {"instruction": "q_text", "response": "answer"}},
                               "train": {"batch_size": 2}})
    with pytest.raises(DataError, match="column 'answer' for role 'response' is not in the data; columns found: "
                                        "q_text, reply"):
        prepare(cfg, tiny_tokenizer)


# ---- a 2 GB upload ----------------------------------------------------------------------------------

def _sparse(path, size=2 * 1024**3):
    with open(path, "wb") as f:
        f.truncate(size)  # 2 GB that take no disk: refusing it must not read it
    return path


def test_two_gigabyte_file_refused_by_size_without_reading_it(tmp_path):
    big = _sparse(tmp_path / "big.jsonl")
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"big\.jsonl: 2,048 MB is larger than the 1,024 MB limit"):
            read_records(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB allocated: the file was read"


def test_data_tab_upload_and_train_start_refuse_a_two_gigabyte_file(tmp_path, studio_home):
    from studio.ui import data, train

    big = _sparse(tmp_path / "big.jsonl")
    current = str(SAMPLES / "finance_alpaca.jsonl")
    tracemalloc.start()
    try:
        path, _, note, *_ = data.on_upload(str(big), current)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert path == current and note.startswith("⚠️ Upload refused") and "larger than" in note
    assert peak < 16 * 2**20
    assert not (studio_home / "uploads").exists() or not any((studio_home / "uploads").iterdir())
    # A huge file already among the uploads is refused by Start too, before any run folder exists.
    uploads = studio_home / "uploads"
    uploads.mkdir(exist_ok=True)
    _sparse(uploads / "huge-0123456789.jsonl")
    store = RunStore()
    rid, msg = train.start_run(store, ["data.path"], _cpu_cfg().to_dict(), "", [str(uploads / "huge-0123456789.jsonl")])
    assert rid is None and "larger than" in msg
    assert store.list() == []


# ---- hyperparameters --------------------------------------------------------------------------------

@pytest.mark.parametrize("data,key", [
    ({"train": {"learning_rate": "nan"}}, "train.learning_rate"),
    ({"train": {"learning_rate": float("inf")}}, "train.learning_rate"),
    ({"train": {"learning_rate": -1e-4}}, "train.learning_rate"),
    ({"train": {"warmup_ratio": 0.9}}, "train.warmup_ratio"),
    ({"train": {"epochs": 0.0, "max_steps": 0}}, "train.epochs"),
    ({"train": {"grad_accum": 10**9}}, "train.grad_accum"),
    ({"train": {"scheduler": "exponential"}}, "train.scheduler"),
    ({"train": {"tensorboard": "maybe"}}, "train.tensorboard"),
    ({"lora": {"r": 0}}, "lora.r"),
    ({"lora": {"dropout": 1.0}}, "lora.dropout"),
    ({"lora": {"bias": "some"}}, "lora.bias"),
    ({"data": {"max_length": 4}}, "data.max_length"),
    ({"data": {"val_fraction": 0.9}}, "data.val_fraction"),
    ({"data": {"template": "custom"}}, "data.custom_prompt"),
    ({"data": {"mapping": ["instruction"]}}, "data.mapping"),
    ({"model": {"base_model": "  "}}, "model.base_model"),
    ({"model": {"compute_dtype": "fp8"}}, "model.compute_dtype"),
])
def test_more_out_of_range_and_contradictory_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(data)
    assert e.value.key == key and str(e.value).startswith(key)


@pytest.mark.parametrize("overrides,hw,key", [
    ({"model.compute_dtype": "fp16"}, CPU, "model.compute_dtype"),
    ({"model.quantization": "int8"}, CPU, "model.quantization"),
    ({"train.optimizer": "paged_adamw_8bit"}, CPU, "train.optimizer"),
    ({"train.optimizer": "adamw_8bit"}, CPU, "train.optimizer"),
    ({"train.optimizer": "paged_adamw_32bit"}, CPU, "train.optimizer"),
    ({"data.max_length": 4096}, CPU, "data.max_length"),  # the tiny model's limit is 512
])
def test_hardware_and_model_contradictions_rejected_by_preflight(overrides, hw, key):
    with pytest.raises(ConfigError) as e:
        preflight(_cpu_cfg(**overrides), hw)
    assert e.value.key == key, str(e.value)
    # NF4 stays allowed on the CPU: bitsandbytes quantizes there too (that is the offline demo).
    assert preflight(_cpu_cfg(), CPU) is CPU


def test_a_run_with_a_bad_setting_fails_before_any_model_loads(studio_home):
    run = RunStore().create(_cpu_cfg(**{"train.optimizer": "paged_adamw_8bit"}), "paged-on-cpu")
    assert Recipe(run).execute() == "failed"
    statuses = [e["status"] for e in run.all_events() if e["type"] == "status"]
    assert statuses == ["created", "failed"]  # preflight runs before "starting": nothing was loaded
    last = run.last_status()
    assert last["reason"] == "input" and last["message"].startswith("train.optimizer: paged_adamw_8bit needs a CUDA")
    assert not run.checkpoints_dir.exists() and not run.adapter_dir.exists()


def test_fewer_examples_than_the_batch_fails_the_run_before_the_model_loads(tmp_path):
    p = _w(tmp_path, "three.jsonl", "\n".join(json.dumps(GOOD) for _ in range(3)))
    run = RunStore().create(_cpu_cfg(**{"data.path": str(p), "data.val_samples": 0, "train.batch_size": 8}), "tiny-data")
    assert Recipe(run).execute() == "failed"
    evs = run.all_events()
    statuses = [e["status"] for e in evs if e["type"] == "status"]
    assert statuses == ["created", "starting", "failed"] and not any(e["type"] == "data" for e in evs)
    assert "train.batch_size: only 3 training examples but the batch size is 8" in run.last_status()["message"]


# ---- base models ------------------------------------------------------------------------------------

def test_unknown_hub_id_offline_is_a_clear_message_without_traceback_or_token():
    cfg = _cpu_cfg(**{"model.base_model": "nobody-here/no-such-model-7b"})
    with pytest.raises(ModelError) as e:
        preflight(cfg, CPU, token=CANARY)
    text = str(e.value)
    assert text.startswith("model.base_model: 'nobody-here/no-such-model-7b' could not be loaded: ")
    assert "Hub could not be reached" in text or "no such model" in text
    assert "Traceback" not in text and 'File "' not in text and CANARY not in text and len(text) < 400


def test_a_run_on_an_unknown_hub_id_fails_with_that_message(studio_home):
    run = RunStore().create(_cpu_cfg(**{"model.base_model": "nobody-here/no-such-model-7b"}), "no-model")
    assert Recipe(run, token=CANARY).execute() == "failed"
    last = run.last_status()
    assert last["reason"] == "input" and "could not be loaded" in last["message"]
    assert CANARY not in run.events_path.read_text()


def test_local_model_folders_without_usable_weights(tmp_path, tiny_model_dir):
    with pytest.raises(ModelError, match="is not a folder"):
        resolve_base(str(tiny_model_dir / "config.json"))
    with pytest.raises(ModelError, match="no config.json; it is not a model folder"):
        resolve_base(str(tmp_path))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_weights)
    with pytest.raises(ModelError, match="has no .safetensors weights"):
        resolve_base(str(no_weights))
    with pytest.raises(ModelError, match="has no .safetensors weights"):
        preflight(_cpu_cfg(**{"model.base_model": str(no_weights)}), CPU)


def _tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_tokenizer_without_pad_token_gets_one_distinct_from_eos(tiny_model_dir):
    from studio.data.tokenize import ensure_pad_token

    tok = _tokenizer(tiny_model_dir)
    tok.pad_token = None
    assert ensure_pad_token(tok) is False  # the unknown token serves, no new embedding row
    assert tok.pad_token_id == tok.unk_token_id != tok.eos_token_id

    tok = _tokenizer(tiny_model_dir)
    tok.pad_token = tok.eos_token  # a common hand-made setting: it would mask EOS out of the loss
    ensure_pad_token(tok)
    assert tok.pad_token_id != tok.eos_token_id

    tok = _tokenizer(tiny_model_dir)
    tok.pad_token, tok.unk_token = None, None
    assert ensure_pad_token(tok) is True  # neither pad nor unk: "<pad>" is set
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id


def test_base_model_grows_its_embeddings_for_a_new_pad_token(tiny_model_dir):
    cfg = _cpu_cfg(**{"model.quantization": "none"})
    tok = load_tokenizer(cfg)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    vocab = len(tok)
    tok.add_special_tokens({"pad_token": "<pad-new>"})  # a pad token the model has no row for
    model = load_base(cfg, tok, CPU)
    assert len(tok) == vocab + 1 and model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
