"""Data pipeline: readers, schema detection, templates, loss masks, statistics, splits."""

import json

import pytest

from conftest import SAMPLES
from studio.config import RunConfig
from studio.data.files import DataError, read_records
from studio.data.pipeline import preview, prepare, split, to_examples
from studio.data.schema import Example, detect, to_example
from studio.data.stats import length_stats
from studio.data.templates import TemplateSpec, render, render_prompt
from studio.data.tokenize import IGNORE, encode_prompt, tokenize_pair, tokenize_pairs

EXPECTED = {
    "finance_alpaca.jsonl": "alpaca",
    "finance_alpaca.parquet": "alpaca",
    "finance_alpaca_val.jsonl": "alpaca",
    "finance_prompt_completion.jsonl": "prompt_completion",
    "finance_messages.jsonl": "messages",
    "finance_sharegpt.json": "sharegpt",
    "finance_columns.csv": "columns",
}


@pytest.mark.parametrize("name,kind", sorted(EXPECTED.items()))
def test_every_sample_is_detected_and_maps(name, kind):
    recs = read_records(SAMPLES / name)
    det = detect(recs)
    assert det.kind == kind, det.message
    examples, skipped = to_examples(recs, det.mapping)
    assert not skipped
    assert all(e.instruction and e.response for e in examples)


@pytest.mark.parametrize("template", ["alpaca", "qa", "chat", "custom"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_template_on_every_sample(name, template, tiny_tokenizer):
    recs = read_records(SAMPLES / name)[:5]
    spec = TemplateSpec(template, "<<{system}>> Q: {instruction} {input}\nA: ", "{response}")
    for ex in to_examples(recs, detect(recs).mapping)[0]:
        prompt, response = render(ex, spec, tiny_tokenizer)
        assert ex.instruction in prompt
        assert ex.response in response
        # The same function builds inference prompts: what the playground sends is what training saw.
        assert render_prompt(ex.instruction, spec, tiny_tokenizer, input=ex.input, system=ex.system) == prompt \
            or ex.messages


def test_alpaca_template_exact_and_input_omitted_when_empty():
    spec = TemplateSpec("alpaca")
    p, r = render(Example(instruction="Do X", input="data", response="Done."), spec)
    assert p == "### Instruction:\nDo X\n\n### Input:\ndata\n\n### Response:\n" and r == "Done."
    p, _ = render(Example(instruction="Do X", input="  ", response="Done."), spec)
    assert p == "### Instruction:\nDo X\n\n### Response:\n"
    assert "### Input" not in p


def test_qa_template_exact():
    # The thorough seed recipe: question, a blank line, answer, a blank line, ### End.
    p, r = render(Example(instruction="What is ROI?", response="Return on investment."), TemplateSpec("qa"))
    assert p + r == "### Question: What is ROI?\n\n### Answer: Return on investment.\n\n### End"


def test_custom_template_rejects_unknown_placeholder():
    with pytest.raises(DataError, match="unknown placeholder"):
        render(Example(instruction="a", response="b"), TemplateSpec("custom", "{question}", "{response}"))


def test_loss_mask_covers_response_and_eos_only(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt, response = render(Example(instruction="Compute ROI.", response="The ROI is 5%."), TemplateSpec("alpaca"))
    t = tokenize_pair(prompt, response, tok, 128)
    n_prompt = len(tok(prompt)["input_ids"])
    assert all(x == IGNORE for x in t.labels[:n_prompt])
    assert t.labels[n_prompt:] == t.input_ids[n_prompt:]
    assert t.input_ids[-1] == tok.eos_token_id and t.labels[-1] == tok.eos_token_id
    assert tok.pad_token_id != tok.eos_token_id
    full = tokenize_pair(prompt, response, tok, 128, train_on_inputs=True)
    assert full.labels == full.input_ids


def test_truncation_and_chat_template_single_bos_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = Example(instruction="word " * 200, response="The answer.")
    t = tokenize_pair(*render(ex, TemplateSpec("alpaca")), tok, 32)
    assert len(t.input_ids) == 32 and t.truncated and t.full_length > 32
    p, r = render(Example(instruction="Hi", response="Hello."), TemplateSpec("chat"), tok)
    t = tokenize_pair(p, r, tok, 128)
    assert t.input_ids.count(tok.bos_token_id) == 1 and t.input_ids.count(tok.eos_token_id) == 2  # user + assistant turn ends
    assert t.labels[-1] == tok.eos_token_id


def test_batched_tokenization_keeps_each_text_and_its_order(tiny_tokenizer):
    """The pipeline tokenizes a file in batches (texts opening with BOS apart from the rest); each row is still
    its own text's ids with EOS, in the file's order, its loss starting where the answer does."""
    tok = tiny_tokenizer
    chat = render(Example(instruction="Hi", response="Hello."), TemplateSpec("chat"), tok)
    pairs = [render(Example(instruction=f"Question {i} " + "word " * (i % 40), response=f"Answer {i}."),
                    TemplateSpec("alpaca")) for i in range(50)]
    pairs[10:10] = [chat, ("### Answer: ", "  spaced"), ("", ""), ("é✓😀 ", "中文 text")]
    rows = tokenize_pairs(pairs, tok, 64)
    assert len(rows) == len(pairs)
    for (p, r), t in zip(pairs, rows):
        alone = tokenize_pair(p, r, tok, 64)
        assert (t.input_ids, t.labels, t.full_length) == (alone.input_ids, alone.labels, alone.full_length)
        ids = tok(p + r, add_special_tokens=not (p + r).startswith(tok.bos_token))["input_ids"]
        ids = ids if ids[-1] == tok.eos_token_id else ids + [tok.eos_token_id]  # the chat template ends with EOS
        assert t.input_ids == ids[:64] and t.full_length == len(ids)
    assert rows[11].labels.count(IGNORE) <= len(encode_prompt(tok, "### Answer: "))


def test_preview_marks_loss_tokens(tiny_tokenizer):
    recs = read_records(SAMPLES / "finance_alpaca.jsonl")[:3]
    exs = to_examples(recs, detect(recs).mapping)[0]
    pv = preview(exs, TemplateSpec("alpaca"), tiny_tokenizer, 128, False, n=3)
    assert len(pv) == 3
    for item in pv:
        flags = [f for _, f in item["tokens"]]
        assert not flags[0] and flags[-1]  # prompt masked, EOS carries loss
        assert "".join(p for p, f in item["tokens"] if f).strip().startswith(item["response"][:5])
        assert item["loss_tokens"] == sum(flags)


def test_length_stats():
    s = length_stats([10, 20, 30, 40, 200], 32)
    assert (s.count, s.max, s.over) == (5, 200, 2)
    assert s.mean_excess == pytest.approx((8 + 168) / 2)
    assert "2 (40.0%) exceed the max length of 32" in s.summary


def test_split_and_sampling_are_seeded():
    exs = [Example(instruction=str(i), response="r") for i in range(100)]
    d = RunConfig.from_dict({"data": {"val_samples": 10, "train_samples": 50, "seed": 3}}).data
    a_train, a_val = split(exs, d)
    b_train, b_val = split(exs, d)
    assert [e.instruction for e in a_train] == [e.instruction for e in b_train]
    assert len(a_train) == 50 and len(a_val) == 10
    assert not {e.instruction for e in a_val} & {e.instruction for e in a_train}
    d2 = RunConfig.from_dict({"data": {"val_fraction": 0.2}}).data
    assert len(split(exs, d2)[1]) == 20


def test_prepare_with_separate_validation_file(tiny_tokenizer):
    cfg = RunConfig.from_dict({"data": {"path": str(SAMPLES / "finance_alpaca.jsonl"),
                                        "val_path": str(SAMPLES / "finance_alpaca_val.jsonl"), "max_length": 64}})
    p = prepare(cfg, tiny_tokenizer)
    assert len(p.train) == 400 and len(p.validation) == 40
    assert p.stats.count == 400
    assert set(p.train.column_names) == {"input_ids", "labels"}


# ---- bad input: a clear message naming the place, and the file untouched -------------------------

def _w(tmp_path, name, content, mode="w"):
    p = tmp_path / name
    if mode == "wb":
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8", newline="")
    return p


def test_malformed_json_line_is_named(tmp_path):
    p = _w(tmp_path, "d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }\n')
    before = p.read_bytes()
    with pytest.raises(DataError, match=r"d.jsonl line 2: not valid JSON"):
        read_records(p)
    assert p.read_bytes() == before


def test_bom_and_crlf_are_accepted(tmp_path):
    p = _w(tmp_path, "d.jsonl", b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\r\n{"prompt": "c", "completion": "d"}\r\n',
           "wb")
    assert [r["prompt"] for r in read_records(p)] == ["a", "c"]


@pytest.mark.parametrize("name,content,match", [
    ("e.jsonl", "", "empty"),
    ("e.jsonl", "\n  \n", "whitespace"),
    ("e.json", '{"a": 1}', "JSON array"),
    ("e.json", "[1, 2]", "item 1"),
    ("e.jsonl", "[1, 2]", "line 1"),
    ("e.txt", "hello", "unsupported file type"),
    ("e.csv", 'a,b\n1,2,3\n', "more values than columns"),
])
def test_bad_files(tmp_path, name, content, match):
    with pytest.raises(DataError, match=match):
        read_records(_w(tmp_path, name, content))


def test_binary_file_renamed_jsonl(tmp_path):
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4
    with pytest.raises(DataError, match="binary file"):
        read_records(_w(tmp_path, "img.jsonl", png, "wb"))


def test_oversized_file_refused_by_size(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_MAX_UPLOAD_MB", "0.001")
    p = _w(tmp_path, "big.jsonl", '{"prompt": "a", "completion": "b"}\n' * 100)
    with pytest.raises(DataError, match="larger than"):
        read_records(p)


def test_csv_embedded_newlines(tmp_path):
    p = _w(tmp_path, "d.csv", 'user,assistant\r\n"line one\nline two","ok, fine"\r\n')
    r = read_records(p)
    assert r == [{"user": "line one\nline two", "assistant": "ok, fine"}]
    assert detect(r).kind == "columns"


def test_wrong_columns_explained():
    det = detect([{"question_text": "a", "reply": "b"}])
    assert det.kind == "unknown"
    assert "'question_text'" in det.message and "'reply'" in det.message


def test_empty_fields_skipped_with_reason_and_mixed_schema():
    recs = [{"instruction": "a", "output": "b"}, {"instruction": "", "output": "b"}, {"instruction": "c"},
            {"prompt": "x", "completion": "y"}]
    exs, skipped = to_examples(recs, detect(recs).mapping, "d.jsonl")
    assert len(exs) == 1 and len(skipped) == 3
    assert "d.jsonl example 2: field 'instruction' is empty" in skipped[0]
    with pytest.raises(DataError, match="no usable examples"):
        to_examples([{"instruction": "", "output": ""}], {"instruction": "instruction", "response": "output"})


def test_conversation_must_end_with_assistant():
    with pytest.raises(DataError, match="assistant turn"):
        to_example({"messages": [{"role": "user", "content": "hi"}]}, {"messages": "messages"})


def test_fewer_examples_than_batch(tmp_path, tiny_tokenizer):
    p = _w(tmp_path, "d.jsonl", "\n".join(json.dumps({"prompt": f"p{i}", "completion": "c"}) for i in range(3)))
    cfg = RunConfig.from_dict({"data": {"path": str(p)}, "train": {"batch_size": 8}})
    with pytest.raises(DataError, match="train.batch_size: only 3 training examples"):
        prepare(cfg, tiny_tokenizer)


def test_hub_loader_path_through_datasets(tmp_path):
    """``read_hub`` goes through ``datasets.load_dataset``; offline it reads a local dataset folder the same way."""
    from studio.data.files import read_hub

    folder = tmp_path / "finance-mini"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"})
                                                 for i in range(5)))
    recs = read_hub(str(folder), split="train")
    assert [r["instruction"] for r in recs] == [f"q{i}" for i in range(5)]
    with pytest.raises(DataError, match="could not be loaded") as e:
        read_hub("nobody/no-such-dataset-xyz", split="train")
    assert "hf_" not in str(e.value)
