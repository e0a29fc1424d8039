"""Data shapes that used to be read wrongly without a word: each one trains on the right text or is refused
with a message naming the file, the line (or row/item) and the field; the Data tab's preview and Start
(``prepare`` in the worker, ``RunConfig`` for settings) agree on every case.

Issue 21 items 7 and 9, and the rest of their classes: conversations (order, tool turns, content parts,
empty, system only), values that are not text (lists, objects, numbers, nulls, Parquet lists and
structs, bytes), file encodings and sizes (UTF-16, NUL, huge lines and fields), duplicate and unnamed
columns, CSV quoting, deep nesting, custom template placeholders, ``--set`` values, truncation.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import SAMPLES

from studio.cli import _config, _parse_set
from studio.config import ConfigError, RunConfig
from studio.data.files import DataError, read_records
from studio.data.pipeline import prepare, to_examples
from studio.data.schema import Example, detect, text_of, to_example
from studio.data.templates import TemplateSpec, render
from studio.presets import load_preset

TINY = "studio-tiny-mistral"


def _w(tmp_path, name, content):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8", newline="")
    return p


def _jsonl(tmp_path, name, rows):
    return _w(tmp_path, name, "\n".join(json.dumps(r) for r in rows) + "\n")


def _parquet(tmp_path, name, columns: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / name
    pq.write_table(pa.table(columns), p)
    return p


def _examples(path):
    recs = read_records(path)
    return to_examples(recs, detect(recs).mapping, path.name)


def _cfg(path, **data):
    return RunConfig.from_dict({"data": {"path": str(path), **data}, "train": {"batch_size": 1}})


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


GOOD_CONV = [U("What is ROI?"), A("Return on investment.")]


# ---- conversations ----------------------------------------------------------------------------------

def test_two_assistant_turns_in_a_row_are_refused_not_trained_as_the_instruction(tmp_path, tiny_tokenizer):
    sharegpt = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "first answer"},
                                   {"from": "gpt", "value": "second answer"}]},
                {"conversations": [{"from": "human", "value": "What is ROI?"},
                                   {"from": "gpt", "value": "Return on investment."}]}]
    p = _jsonl(tmp_path, "chat.jsonl", sharegpt)
    exs, skipped = _examples(p)
    assert [e.instruction for e in exs] == ["What is ROI?"]
    assert skipped == ["chat.jsonl line 1, field 'conversations' turn 3: a second 'assistant' turn in a row; "
                       "user and assistant turns must alternate (merge the two turns or remove one)."]
    # The run skips it the same way, and says so; nothing trains on "first answer" as a prompt.
    prep = prepare(_cfg(p), tiny_tokenizer)
    assert prep.skipped == skipped and all("first answer" not in e.instruction for e in prep.train_examples)
    only_bad = _jsonl(tmp_path, "bad.jsonl", sharegpt[:1])
    with pytest.raises(DataError, match=r"no usable examples .*bad\.jsonl line 1, field 'conversations' turn 3"):
        prepare(_cfg(only_bad), tiny_tokenizer)


@pytest.mark.parametrize("turns,match", [
    ([U("a"), U("b"), A("c")], r"turn 2: a second 'user' turn in a row"),
    ([A("hello"), U("a"), A("b")], r"turn 1: the conversation starts with an assistant turn"),
    ([{"role": "system", "content": "s"}, U("a"), {"role": "system", "content": "s2"}, A("b")],
     r"turn 3: a system turn after the conversation began"),
    ([U("a"), {"role": "tool", "content": "42"}, A("b")], r"turn 2 is a tool or function turn \('tool'\)"),
    ([U("a"), {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, {"role": "tool", "content": "4"},
      A("b")], r"turn 2 is a tool or function turn \('assistant' with tool_calls\)"),
    ([U("a"), {"role": "function_call", "content": "{}"}, A("b")], r"turn 2 is a tool or function turn"),
    ([U("a"), {"role": "narrator", "content": "x"}, A("b")], r"turn 2: unknown role 'narrator'"),
    ([{"role": "system", "content": "You help."}], r"the conversation has no user turn"),
    ([], r"the conversation is empty"),
    (None, r"the conversation is missing"),
    ("just text", r"the conversation is not a list of turns \(found str\)"),
    ([U(""), A("b"), U("c"), A("d")], r"turn 1: the user turn is empty"),
    ([U("a"), A("")], r"must end with a non-empty assistant turn"),
    ([U("a"), "not a turn"], r"turn 2: a turn is not an object"),
    ([U([{"type": "image_url", "image_url": {"url": "x"}}]), A("b")], r"turn 1 \(user\) part 1 is an 'image_url' part"),
    ([U("a"), A({"weird": 1})], r"turn 2 \(assistant\) holds an object"),
])
def test_conversations_that_cannot_be_trained_name_the_turn(turns, match):
    with pytest.raises(DataError, match=r"d\.jsonl line 4, field 'messages'.*" + match):
        to_example({"messages": turns}, {"messages": "messages"}, "d.jsonl line 4")


def test_an_empty_system_turn_is_dropped_and_numbers_still_count_turns_as_written():
    ex = to_example({"messages": [{"role": "system", "content": ""}, U("q"), A("a")]}, {"messages": "messages"})
    assert (ex.system, ex.instruction, ex.response) == ("", "q", "a")
    with pytest.raises(DataError, match=r"turn 3: a second 'user' turn"):
        to_example({"messages": [{"role": "system", "content": " "}, U("q"), U("q2"), A("a")]},
                   {"messages": "messages"})


def test_content_given_as_a_list_of_parts_trains_on_its_text(tmp_path, tiny_tokenizer):
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "ROI?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Return on investment."}]}]
    p = _jsonl(tmp_path, "parts.jsonl", [{"messages": parts}])
    (ex,), skipped = _examples(p)
    assert not skipped
    assert (ex.system, ex.instruction, ex.response) == ("Be brief.", "What is ROI?", "Return on investment.")
    assert ex.messages[1] == {"role": "user", "content": "What is ROI?"}
    prompt, response = render(ex, TemplateSpec("alpaca"))
    assert prompt == "Be brief.\n\n### Instruction:\nWhat is ROI?\n\n### Response:\n" and "type" not in prompt
    prompt, response = render(ex, TemplateSpec("chat"), tiny_tokenizer)
    assert "What is ROI?" in prompt and "{'type'" not in prompt + response
    # Flat columns may hold parts too.
    assert text_of([{"type": "text", "text": "a"}, {"text": "b"}], "x") == "ab"


def test_a_conversation_in_a_first_record_that_is_empty_does_not_hide_the_schema(tmp_path):
    p = _jsonl(tmp_path, "c.jsonl", [{"messages": []}, {"messages": GOOD_CONV}])
    recs = read_records(p)
    assert detect(recs).kind == "messages"
    exs, skipped = to_examples(recs, detect(recs).mapping)
    assert len(exs) == 1 and skipped == ["c.jsonl line 1, field 'messages': the conversation is empty."]


def test_chat_messages_written_as_json_text_in_a_csv_cell(tmp_path):
    cell = json.dumps(GOOD_CONV).replace('"', '""')
    p = _w(tmp_path, "chat.csv", f'id,messages\r\n1,"{cell}"\r\n')
    recs = read_records(p)
    assert detect(recs).kind == "messages"
    (ex,), _ = to_examples(recs, detect(recs).mapping)
    assert (ex.instruction, ex.response) == ("What is ROI?", "Return on investment.")


# ---- Parquet: lists and structs are data, not numpy text ---------------------------------------------

def test_chat_messages_in_a_parquet_file_are_read(tmp_path, tiny_tokenizer):
    p = _parquet(tmp_path, "chat.parquet", {"messages": [GOOD_CONV, [U("What is EPS?"), A("Earnings per share.")]]})
    recs = read_records(p)
    assert isinstance(recs[0]["messages"], list) and detect(recs).kind == "messages"
    exs, skipped = to_examples(recs, detect(recs).mapping)
    assert not skipped and [e.response for e in exs] == ["Return on investment.", "Earnings per share."]
    prep = prepare(_cfg(p), tiny_tokenizer)
    assert len(prep.train) == 2


def test_list_valued_parquet_cells_are_refused_with_the_row_and_field(tmp_path, tiny_tokenizer):
    p = _parquet(tmp_path, "lists.parquet", {"instruction": ["q1", "q2"], "output": [["a", "b"], ["c"]]})
    with pytest.raises(DataError) as e:
        prepare(_cfg(p), tiny_tokenizer)
    assert "lists.parquet row 1, field 'output' holds a list of 2 values, not text" in str(e.value)
    assert "array(" not in str(e.value) and "['a'" not in str(e.value)
    # Parts in a Parquet struct list are text.
    p = _parquet(tmp_path, "parts.parquet", {"instruction": ["q"], "output": [[{"type": "text", "text": "a"}]]})
    (ex,), _ = _examples(p)
    assert ex.response == "a"


def test_parquet_nulls_numbers_dates_and_bytes(tmp_path):
    import datetime
    import decimal

    p = _parquet(tmp_path, "v.parquet", {
        "instruction": ["q1", None, "q3", "q4"],
        "input": [datetime.date(2024, 1, 31), None, None, datetime.date(2024, 2, 29)],
        "price": [decimal.Decimal("1.50")] * 4,
        "output": ["answer", "a2", None, "7"], "raw": [b"bytes answer", b"x", b"y", b"z"]})
    exs, skipped = to_examples(read_records(p), {"instruction": "instruction", "input": "input", "response": "raw"},
                               "v.parquet")
    assert [(e.instruction, e.input, e.response) for e in exs] == [("q1", "2024-01-31", "bytes answer"),
                                                                  ("q3", "", "y"), ("q4", "2024-02-29", "z")]
    exs, skipped = _examples(p)
    assert [(e.instruction, e.input, e.response) for e in exs] == [("q1", "2024-01-31", "answer"),
                                                                  ("q4", "2024-02-29", "7")]
    assert text_of(read_records(p)[0]["price"], "x") == "1.50"
    assert skipped == ["v.parquet row 2: field 'instruction' is empty or missing.",
                       "v.parquet row 3: field 'output' is empty or missing."]


def test_duplicate_parquet_columns_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["q"]), pa.array(["a"]), pa.array(["b"])],
                                        names=["instruction", "output", "output"]), p)
    with pytest.raises(DataError, match=r"dup\.parquet: column 'output' is named twice"):
        read_records(p)


# ---- values that are not text ---------------------------------------------------------------------

@pytest.mark.parametrize("value,text", [(42, "42"), (0.5, "0.5"), (True, "true"), (None, ""), (float("nan"), ""),
                                        ("text", "text"), ([], "")])
def test_scalar_values_read_as_their_json_text(value, text):
    assert text_of(value, "x") == text


@pytest.mark.parametrize("value,match", [
    (["a", "b"], "holds a list of 2 values, not text"),
    ({"a": 1}, r"holds an object \(\{'a': 1\}\), not text"),
    ([{"type": "image", "url": "x"}], "part 1 is an 'image' part"),
    ([{"type": "text"}], "part 1 is not a text part"),
    (b"\xff\xfe", "holds binary data, not UTF-8 text"),
])
def test_values_that_are_not_text_are_refused_with_the_place(value, match):
    with pytest.raises(DataError, match=r"d\.jsonl line 3, field 'output' " + match):
        to_example({"instruction": "q", "output": value}, {"instruction": "instruction", "response": "output"},
                   "d.jsonl line 3")


def test_deep_values_are_refused_without_their_python_text(tmp_path):
    p = _w(tmp_path, "d.jsonl", json.dumps({"instruction": "q", "output": [[[[[["deep"]]]]]]}) + "\n")
    with pytest.raises(DataError) as e:
        to_examples(read_records(p), {"instruction": "instruction", "response": "output"})
    assert "d.jsonl line 1, field 'output' holds a list of 1 values" in str(e.value) and "[[" not in str(e.value)


# ---- files: nesting, encodings, sizes, columns, quoting ---------------------------------------------

@pytest.mark.parametrize("name,text,match", [
    ("deep.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
     r"deep\.jsonl line 2: nested too deeply to read"),
    ("deep.json", "[" + "[" * 100_000 + "]" * 100_000 + "]", r"deep\.json: nested too deeply to read"),
    ("dup.jsonl", '{"instruction": "a", "output": "b", "output": "c"}\n', r"dup\.jsonl line 1: key 'output' appears twice"),
    ("dup.json", '[{"instruction": "a", "instruction": "b", "output": "c"}]', r"dup\.json: key 'instruction' appears twice"),
    ("dup.csv", "instruction,output,output\nq,a,b\n", r"dup\.csv line 1: column 'output' is named twice"),
    ("dup2.csv", "instruction, output,output \nq,a,b\n", r"line 1: column 'output' is named twice"),
    ("open.csv", 'instruction,output\nq1,a1\n"q2,a2\nq3,a3\nq4,a4\n',
     r"open\.csv line 3: a quoted value starting on this line is never closed"),
    ("stray.csv", 'instruction,output\nq1,"a1"x\n', r"stray\.csv line 2: .*check the quoting"),
    ("nul.jsonl", '{"instruction": "a\x00", "output": "b"}\n'.encode("utf-16"), r"nul\.jsonl line 1: holds a NUL"),
])
def test_files_that_cannot_be_read_as_written_name_the_place(tmp_path, name, text, match):
    with pytest.raises(DataError, match=match):
        read_records(_w(tmp_path, name, text))


def test_deep_json_in_the_preview_is_a_sentence_not_a_bare_error(tmp_path, studio_home, tiny_model_dir):
    from studio.ui import data

    f = _w(tmp_path, "deep.jsonl", '{"instruction": ' + "[" * 100_000 + "]" * 100_000 + ', "output": "b"}\n')
    path, *_ = data.on_upload(str(f), "")
    *_, status = data.refresh(path, "", "", "train", "instruction", "", "output", "", "", "alpaca", "", "{response}",
                              128, False, TINY, 2)
    assert status.startswith("⚠️ deep-") and "line 1: nested too deeply to read" in status


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-16-le", "utf-16-be"])
def test_text_saved_as_utf16_or_utf32_with_a_bom_is_read(tmp_path, encoding):
    text = 'instruction,output\r\n"Qu\'est-ce que le ROI ?","Le retour sur investissement, 5 €."\r\n'
    raw = text.encode(encoding)
    if encoding.endswith(("-le", "-be")):
        raw = "\ufeff".encode(encoding) + raw
    recs = read_records(_w(tmp_path, "d.csv", raw))
    assert recs == [{"instruction": "Qu'est-ce que le ROI ?", "output": "Le retour sur investissement, 5 €."}]


def test_utf16_without_a_bom_is_named_as_such(tmp_path):
    with pytest.raises(DataError, match="looks like UTF-16 text without a byte-order mark; save the file as UTF-8"):
        read_records(_w(tmp_path, "d.jsonl", '{"instruction": "a", "output": "b"}\n'.encode("utf-16-le")))


def test_huge_fields_and_lines_are_read_whole(tmp_path):
    long = "word " * 60_000  # 300 kB: over csv's default 128 KiB field limit
    p = _w(tmp_path, "big.csv", f'instruction,output\r\nq,"{long}"\r\nq2,a2\r\n')
    recs = read_records(p)
    assert recs[0]["output"] == long and recs[1] == {"instruction": "q2", "output": "a2"}
    assert recs.where(1) == "big.csv line 3"
    p = _jsonl(tmp_path, "big.jsonl", [{"instruction": "q", "output": "x" * 3_000_000}, {"instruction": "q2",
                                                                                         "output": "a2"}])
    assert len(read_records(p)[0]["output"]) == 3_000_000


def test_unnamed_csv_columns_get_a_name_and_line_numbers_follow_multiline_values(tmp_path):
    p = _w(tmp_path, "d.csv", ',instruction,output\n0,"two\nlines",a\n\n1,q,\n')
    recs = read_records(p)
    assert recs == [{"column 1": "0", "instruction": "two\nlines", "output": "a"},
                    {"column 1": "1", "instruction": "q", "output": ""}]
    exs, skipped = to_examples(recs, detect(recs).mapping)
    assert skipped == ["d.csv line 5: field 'output' is empty or missing."]


def test_json_array_items_are_named_by_their_position(tmp_path):
    p = _w(tmp_path, "d.json", json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q", "output": ["x"]}]))
    assert _examples(p)[1] == ["d.json item 2, field 'output' holds a list of 1 values, not text; map a column that "
                               "holds text (or give the text as a string)."]


# ---- custom template placeholders: refused by the preview, Start and rendering alike -----------------

@pytest.mark.parametrize("prompt,response,key,match", [
    ("Q: {instruction}\nA: ", "{response:>10}", "data.custom_response", r"placeholder \{response:>10\} has a format spec"),
    ("Q: {instruction:d}\nA: ", "{response}", "data.custom_prompt", r"\{instruction:d\} has a format spec"),
    ("Q: {instruction!r}\nA: ", "{response}", "data.custom_prompt", r"\{instruction!r\} has a conversion"),
    ("Q: {instruction[0]}\nA: ", "{response}", "data.custom_prompt", r"unknown placeholder \{instruction\[0\]\}"),
    ("Q: {instruction.upper}\nA: ", "{response}", "data.custom_prompt", r"unknown placeholder"),
    ("Q: {}\nA: ", "{response}", "data.custom_prompt", r"unknown placeholder \{\}"),
    ("Q: {output}\nA: ", "{response}", "data.custom_prompt", r"unknown placeholder \{output\}"),
    ("Q: {instruction}\nA: {response}", "{response}", "data.custom_prompt", r"holds \{response\}"),
    ("Q: {instruction}\nA: ", "{{response}}", "data.custom_response", r"must contain \{response\}"),
    ("Q: {instruction\nA: ", "{response}", "data.custom_prompt", r"unmatched '\{'"),
    ("Q: {{instruction}}\nA: ", "{response}", "data.custom_prompt", r"has no \{instruction\}: every example would "
                                                                   r"get the same prompt"),
    ("", "{response}", "data.custom_prompt", r"is empty"),
    ("  \n ", "{response}", "data.custom_prompt", r"is empty"),
])
def test_a_custom_template_that_cannot_render_is_refused_everywhere(prompt, response, key, match, studio_home,
                                                                    tiny_model_dir):
    from studio.runs import RunStore
    from studio.ui import data, train

    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"data": {"template": "custom", "custom_prompt": prompt, "custom_response": response}})
    assert e.value.key == key and re.search(match, str(e.value)), str(e.value)
    with pytest.raises(DataError, match=re.escape(str(e.value))):
        render(Example(instruction="q", response="a"), TemplateSpec("custom", prompt, response))
    *_, status = data.refresh(str(SAMPLES / "finance_alpaca.jsonl"), "", "", "train", "instruction", "input", "output",
                              "", "", "custom", prompt, response, 128, False, TINY, 2)
    assert status == f"⚠️ {e.value}"
    cfg = load_preset("tiny-demo").replace({"data.path": str(SAMPLES / "finance_alpaca.jsonl")})
    keys = ["data.template", "data.custom_prompt", "data.custom_response"]
    rid, msg = train.start_run(RunStore(), keys, cfg.to_dict(), "", ["custom", prompt, response])
    assert rid is None and str(e.value) in msg and RunStore().list() == []


def test_a_custom_template_with_bare_placeholders_and_literal_braces_renders():
    spec = TemplateSpec("custom", "{{json}} {system}|{instruction}|{input}\n", "{response} }}")
    assert render(Example(instruction="q", input="i", system="s", response="r"), spec) == ("{json} s|q|i\n", "r }")


# ---- --set on the command line -------------------------------------------------------------------------

def test_set_takes_text_fields_as_typed_and_reads_other_fields_as_yaml():
    over = _parse_set(["data.custom_prompt=### Question: {instruction}\n\n### Answer: ",
                       "data.custom_response={response}", "output.run_name=yes", "data.template=custom",
                       "train.learning_rate=1e-4", "train.epochs=2", "train.tensorboard=true",
                       "lora.target_modules=[q_proj, v_proj]", "data.mapping={instruction: user, response: assistant}"])
    assert over["data.custom_prompt"] == "### Question: {instruction}\n\n### Answer: "
    assert over["data.custom_response"] == "{response}" and over["output.run_name"] == "yes"
    assert over["train.epochs"] == 2 and over["train.tensorboard"] is True
    assert over["lora.target_modules"] == ["q_proj", "v_proj"]
    assert over["data.mapping"] == {"instruction": "user", "response": "assistant"}


def test_set_a_template_starting_with_hashes_reaches_the_config_intact():
    class Args:
        preset, data, name = "tiny-demo", None, None
        set = ["data.template=custom", "data.custom_prompt=### Q: {instruction}\n### A: ", "data.custom_response= {response}"]

    cfg = _config(Args)
    assert (cfg.data.custom_prompt, cfg.data.custom_response) == ("### Q: {instruction}\n### A: ", " {response}")
    Args.set = ["data.template=custom", "data.custom_prompt=### all of this is a comment to YAML: {instruction}"]
    assert _config(Args).data.custom_prompt == "### all of this is a comment to YAML: {instruction}"
    Args.set = ["data.template=custom", "data.custom_prompt=### Q: {question}"]
    with pytest.raises(ConfigError, match=r"data.custom_prompt: unknown placeholder \{question\}"):
        _config(Args)


def test_set_bad_yaml_for_a_number_names_the_key():
    with pytest.raises(ConfigError, match=r"train.epochs: could not read"):
        _parse_set(["train.epochs=[1"])


# ---- the preview says ready only where training starts -------------------------------------------------

def test_every_response_cut_by_max_length_is_refused_by_preview_and_run_alike(tiny_model_dir, tiny_tokenizer):
    from studio.ui import data

    path = str(SAMPLES / "finance_alpaca.jsonl")
    *_, status = data.refresh(path, "", "", "train", "instruction", "input", "output", "", "", "alpaca", "",
                              "{response}", 8, False, TINY, 2)
    with pytest.raises(DataError) as e:
        prepare(_cfg(path, max_length=8), tiny_tokenizer)
    assert status == f"⚠️ {e.value}" and "every example's response is cut off at 8 tokens" in status


def test_start_refuses_what_the_preview_refuses_with_the_same_sentence(studio_home, tiny_model_dir):
    from studio.runs import RunStore
    from studio.ui import data, train

    path = str(SAMPLES / "finance_alpaca.jsonl")
    base = load_preset("tiny-demo").to_dict()
    cases = [(["data.max_length"], [8], (8, 0)), (["data.val_samples"], [400], (128, 400))]
    for keys, values, (max_length, val_samples) in cases:
        *_, status = data.refresh(path, "", "", "train", "instruction", "input", "output", "", "", "alpaca", "",
                                  "{response}", max_length, False, TINY, 2, 0, val_samples, 0.0, "", 42)
        rid, msg = train.start_run(RunStore(), ["data.path", *keys], base, "", [path, *values])
        assert status.startswith("⚠️") and rid is None and msg == status, (status, msg)
    assert RunStore().list() == []
    # What the preview calls ready, Start starts.
    *_, status = data.refresh(path, "", "", "train", "instruction", "input", "output", "", "", "alpaca", "",
                              "{response}", 128, False, TINY, 2, 0, 24, 0.0, "", 42)
    assert status.startswith("✅")
    train.check_data(train.to_config(RunConfig.from_dict(base), ["data.path"], [path]))


def test_some_responses_cut_away_are_counted_by_the_preview_as_the_run_drops_them(tmp_path, tiny_model_dir,
                                                                                 tiny_tokenizer, studio_home):
    from studio.ui import data

    rows = [{"instruction": "q" if i % 3 else "long " * 40, "output": "a"} for i in range(9)]
    f = _jsonl(tmp_path, "cut.jsonl", rows)
    path, *_ = data.on_upload(str(f), "")
    *_, status = data.refresh(path, "", "", "train", "instruction", "", "output", "", "", "alpaca", "", "{response}",
                              24, False, TINY, 2)
    prep = prepare(_cfg(path, max_length=24), tiny_tokenizer)
    assert prep.dropped_fully_truncated == 3 and len(prep.train) == 6
    assert status.startswith("✅ 9 examples ready") and \
        "3 training examples lose the whole response to the max length of 24 tokens and will be left out" in status


@pytest.mark.parametrize("settings,match", [
    ({"val_samples": 400}, r"data.val_samples: 400 validation examples leave none of the 400 for training"),
    ({"val_samples": 10, "val_fraction": 0.1}, r"data.val_samples: and data.val_fraction are both set"),
])
def test_the_validation_split_is_checked_by_the_preview_as_by_the_run(settings, match, tiny_model_dir, tiny_tokenizer):
    from studio.ui import data

    path = str(SAMPLES / "finance_alpaca.jsonl")
    *_, status = data.refresh(path, "", "", "train", "instruction", "input", "output", "", "", "alpaca", "",
                              "{response}", 128, False, TINY, 2, 0, settings.get("val_samples", 0),
                              settings.get("val_fraction", 0.0), "", 42)
    assert status.startswith("⚠️") and re.search(match, status), status
    with pytest.raises((DataError, ConfigError), match=match):
        prepare(_cfg(path, **settings), tiny_tokenizer)


def test_a_separate_validation_file_is_read_by_the_preview(tiny_model_dir):
    from studio.ui import data

    *_, status = data.refresh(str(SAMPLES / "finance_alpaca.jsonl"), "", "", "train", "instruction", "input",
                              "output", "", "", "alpaca", "", "{response}", 128, False, TINY, 2, 0, 0, 0.0,
                              str(SAMPLES / "finance_alpaca_val.jsonl"), 42)
    assert status.startswith("✅ 400 examples ready (400 for training, 40 for validation)"), status
    *_, status = data.refresh(str(SAMPLES / "finance_alpaca.jsonl"), "", "", "train", "instruction", "input",
                              "output", "", "", "alpaca", "", "{response}", 128, False, TINY, 2, 0, 0, 0.0,
                              "/etc/passwd", 42)
    assert status.startswith("⚠️") and "reads only its samples and uploaded files" in status


@pytest.mark.parametrize("sep,shown", [(";", "semicolons"), ("\t", "tabs")])
def test_a_csv_saved_with_another_separator_is_named(tmp_path, sep, shown):
    p = _w(tmp_path, "eu.csv", f"instruction{sep}output\nq{sep}a\n")
    with pytest.raises(DataError, match=rf"eu\.csv line 1: the columns are separated by {shown}, not commas"):
        read_records(p)


def test_a_chat_template_that_refuses_a_conversation_is_a_data_error():
    from studio.data.schema import Example

    class Strict:
        chat_template = "x"

        def apply_chat_template(self, messages, **kw):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")

    with pytest.raises(DataError, match=r"data.template: the model's chat template refused this conversation "
                                        r"\(ValueError: Conversation roles must alternate"):
        render(Example(instruction="q", system="s", response="a"), TemplateSpec("chat"), Strict())


def test_start_refuses_fewer_examples_than_the_batch_as_the_run_does(tmp_path, studio_home, tiny_model_dir,
                                                                       tiny_tokenizer):
    from studio.runs import RunStore
    from studio.ui import data, train

    f = _jsonl(tmp_path, "three.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(3)])
    path, *_ = data.on_upload(str(f), "")
    base = load_preset("tiny-demo").to_dict()
    rid, msg = train.start_run(RunStore(), ["data.path", "data.val_samples"], base, "", [path, 0])
    with pytest.raises(DataError) as e:
        prepare(RunConfig.from_dict({"data": {"path": path}, "train": {"batch_size": 8}}), tiny_tokenizer)
    assert rid is None and msg == f"⚠️ {e.value}" and "only 3 training examples but the batch size is 8" in msg


def test_records_handed_over_with_numpy_values_are_read_as_their_values(tiny_tokenizer):
    import numpy as np

    recs = [{"messages": np.array([U("What is ROI?"), A("Return on investment.")], dtype=object)},
            {"messages": np.array([U("q"), A("a"), A("a again")], dtype=object)}]
    assert detect(recs).kind == "messages"
    exs, skipped = to_examples(recs, {"messages": "messages"}, "frame")
    assert [e.instruction for e in exs] == ["What is ROI?"] and "frame example 2" in skipped[0]
    assert text_of(np.int64(7), "x") == "7" and text_of(np.float64("nan"), "x") == ""
    with pytest.raises(DataError, match="holds a list of 2 values"):
        text_of(np.array(["a", "b"]), "x")


@pytest.mark.parametrize("roles,match", [
    (["output", "", "output", "", ""], r"mapping: column 'output' is mapped to both 'instruction' and 'response'"),
    (["instruction", "", "output", "", "input"], r"mapping: 'messages' is mapped to 'input', so instruction, "
                                                 r"response would be ignored"),
])
def test_a_mapping_that_would_train_the_wrong_text_is_refused_by_preview_and_start(roles, match, studio_home,
                                                                                   tiny_model_dir):
    from studio.runs import RunStore
    from studio.ui import data, train

    path = str(SAMPLES / "finance_alpaca.jsonl")
    *_, status = data.refresh(path, "", "", "train", *roles, "alpaca", "", "{response}", 128, False, TINY, 2)
    assert re.search(match, status), status
    mapping = {r: c for r, c in zip(data.ROLE_ORDER, roles) if c}
    rid, msg = train.start_run(RunStore(), ["data.path", "data.mapping"], load_preset("tiny-demo").to_dict(), "",
                               [path, mapping])
    assert rid is None and msg == status


def test_the_served_preview_names_file_line_and_field(tmp_path, studio_home, tiny_model_dir):
    """As a browser or API client sends them: uploaded files, then the /preview endpoint."""
    import socket

    import gradio as gr
    from gradio_client import Client

    from studio.ui import data
    from studio.ui.context import UIContext

    def upload(name, text):
        f = _w(tmp_path, name, text)
        return data.on_upload(str(f), "")[0]

    chat = upload("chat.jsonl", json.dumps({"conversations": [{"from": "human", "value": "q"},
                                                              {"from": "gpt", "value": "a1"},
                                                              {"from": "gpt", "value": "a2"}]}) + "\n")
    deep = upload("deep.json", "[" * 50_000 + "]" * 50_000)
    parts = upload("parts.jsonl", json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]},
                                                           {"role": "assistant", "content": "Hello."}]}) + "\n")
    with gr.Blocks() as demo:
        data.build(UIContext())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)

        def status(path, roles, template="alpaca", prompt="", response="{response}", **kw):
            return client.predict(path, "", "", "train", *roles, template, prompt, response, 128, False, TINY, 2,
                                  0, 0, 0.0, "", 42, api_name="/preview")[-1]

        # Empty roles: as detected (an API client cannot set a dropdown to a column the page has not listed).
        s = status(chat, ["", "", "", "", ""])
        assert "chat-" in s and ".jsonl line 1, field 'conversations' turn 3: a second 'assistant' turn in a row" in s
        s = status(deep, ["", "", "", "", ""])
        assert s.startswith("⚠️ deep-") and "nested too deeply to read" in s
        s = status(parts, ["", "", "", "", ""])
        assert s.startswith("✅ 1 examples ready")
        s = status(str(SAMPLES / "finance_alpaca.jsonl"), ["instruction", "input", "output", "", ""], "custom",
                   "Q: {instruction}\nA: ", "{response:>10}")
        assert s == "⚠️ data.custom_response: placeholder {response:>10} has a format spec; write it bare, as {response}."
    finally:
        demo.close()


def test_a_lone_surrogate_escaped_in_json_is_refused_with_the_place(tmp_path, tiny_tokenizer):
    p = _w(tmp_path, "s.jsonl", '{"instruction": "q", "output": "a"}\n{"instruction": "bad \\ud800 here", "output": "a"}\n')
    exs, skipped = _examples(p)
    assert len(exs) == 1 and skipped == ["s.jsonl line 2, field 'instruction' holds an invalid character ('\\ud800', "
                                         "half of a UTF-16 pair, at character 5); fix or remove it."]
    assert len(prepare(_cfg(p), tiny_tokenizer).train) == 1  # the run skips it too, instead of a TypeError


def test_files_joined_with_cat_keep_their_lines_and_an_empty_parquet_says_so(tmp_path):
    joined = '\ufeff{"instruction": "a", "output": "b"}\n'.encode() + '\ufeff{"instruction": "c", "output": "d"}\n'.encode()
    assert [r["instruction"] for r in read_records(_w(tmp_path, "j.jsonl", joined))] == ["a", "c"]
    p = _parquet(tmp_path, "empty.parquet", {"instruction": __import__("pyarrow").array([], "string")})
    with pytest.raises(DataError, match=r"empty\.parquet: no examples found"):
        read_records(p)


def test_cli_data_of_your_own_is_detected_afresh_on_a_preset_with_a_mapping():
    class Args:
        preset, name, set = "mistral-7b-finance-fast", None, None
        data = str(SAMPLES / "finance_alpaca.jsonl")

    cfg = _config(Args)
    assert cfg.data.path == Args.data and cfg.data.mapping == {}
    Args.set = ["data.mapping={instruction: instruction, response: output}"]
    assert _config(Args).data.mapping == {"instruction": "instruction", "response": "output"}
    Args.data, Args.set = None, None
    assert _config(Args).data.mapping == {"instruction": "user", "input": "system", "response": "assistant"}


def test_a_binary_file_with_many_zero_bytes_is_not_called_utf16(tmp_path):
    blob = b"PK\x03\x04" + b"\x00" * 3000 + bytes(range(1, 256)) * 4
    with pytest.raises(DataError, match="binary file"):
        read_records(_w(tmp_path, "z.json", blob))


def test_json_keys_with_stray_spaces_or_capitals_are_still_detected():
    recs = [{" Instruction ": "q", "Output ": "a"}]
    det = detect(recs)
    assert det.mapping == {"instruction": " Instruction ", "response": "Output "}
    (ex,), _ = to_examples(recs, det.mapping)
    assert (ex.instruction, ex.response) == ("q", "a")


def test_mixed_flat_and_conversation_records_name_each_skip(tmp_path):
    p = _jsonl(tmp_path, "mix.jsonl", [{"messages": GOOD_CONV}, {"instruction": "q", "output": "a"},
                                       {"messages": {"0": U("q")}}])
    exs, skipped = _examples(p)
    assert len(exs) == 1
    assert skipped == ["mix.jsonl line 2, field 'messages': the conversation is missing.",
                       "mix.jsonl line 3, field 'messages': the conversation is not a list of turns (found dict)."]


def test_set_choices_are_words_and_an_empty_mapping_clears_it():
    over = _parse_set(["data.template = qa", "data.mapping=", "data.custom_response= {response}"])
    assert over == {"data.template": "qa", "data.mapping": None, "data.custom_response": " {response}"}
    cfg = load_preset("mistral-7b-finance-fast").replace(over)
    assert cfg.data.template == "qa" and cfg.data.mapping == {} and cfg.data.custom_response == " {response}"
    with pytest.raises(ConfigError, match=r"train.epochs: expected float, got None"):
        load_preset("tiny-demo").replace(_parse_set(["train.epochs="]))
