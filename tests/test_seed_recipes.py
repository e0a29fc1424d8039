"""Every shipped preset and template against its seed recipe, character by character.

The recipes, as they were written by hand before the studio (``bench/seed_recipe.py`` is the fast one):
- fast: ``Josephgflowers/Finance-Instruct-500k`` (columns system, user, assistant), 20,000 train / 1,000
  validation sampled, Alpaca without the Stanford preamble:
  ``### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n{output}``, the Input block
  omitted when the input is empty.  The preset says which column fills which slot: user -> Instruction,
  system -> Input, assistant -> Response.
- thorough: ``### Question: {prompt}``, a blank line, ``### Answer: {completion}``, a blank line, ``### End``.
No hub is reachable here: the fast preset's dataset is stood in for by ``samples/finance_columns.csv``,
which has that dataset's three columns (some rows with an empty system), read through the preset's own
mapping.  The text is compared as a string and as the tokens the model is trained on (decoded back),
and the Playground's prompt (``render_prompt``, what ``generate`` sends) must be the recipe's text up to
the answer, and its ids (``encode_prompt``) the masked start of the training ids.  The text is tokenized
as one string, as the recipes do: a Llama/Mistral-style sentencepiece tokenizer (built here, offline)
would otherwise put a space before every answer that is in neither the template nor the data.
"""

from __future__ import annotations

import csv

import pytest
from conftest import SAMPLES

from studio.data.files import read_records
from studio.data.pipeline import prepare, select
from studio.data.templates import TemplateSpec, describe, render, render_prompt, stop_strings
from studio.data.tokenize import IGNORE, encode_prompt, tokenize_pair
from studio.presets import list_presets, load_preset


def alpaca_recipe(instruction: str, input: str, output: str) -> tuple[str, str]:
    """The fast recipe's formatter (bench/seed_recipe.py): (prompt, answer)."""
    inp = f"### Input:\n{input}\n\n" if input else ""
    return f"### Instruction:\n{instruction}\n\n{inp}### Response:\n", output


def qa_recipe(prompt: str, completion: str) -> tuple[str, str]:
    """The thorough recipe's formatter: (prompt, answer)."""
    return f"### Question: {prompt}\n\n### Answer: ", f"{completion}\n\n### End"


# Where each shipped preset's examples come from here (offline), and the recipe rows they must become.
HUB_STAND_INS = {"Josephgflowers/Finance-Instruct-500k": SAMPLES / "finance_columns.csv"}
RECIPE_DATA = {"qa": SAMPLES / "finance_prompt_completion.jsonl"}


def recipe_rows(cfg) -> list[tuple[str, str]]:
    """The recipe's own (prompt, answer) for every row of the preset's data, from the raw file."""
    d = cfg.data
    if d.template == "qa":
        return [qa_recipe(r["prompt"], r["completion"]) for r in read_records(RECIPE_DATA["qa"])]
    if d.hub_dataset == "Josephgflowers/Finance-Instruct-500k":
        with open(HUB_STAND_INS[d.hub_dataset], newline="", encoding="utf-8") as f:
            return [alpaca_recipe(r["user"], r["system"], r["assistant"]) for r in csv.DictReader(f)]
    return [alpaca_recipe(r["instruction"], r["input"], r["output"]) for r in read_records(SAMPLES / d.path.split("/")[-1])]


def local_config(cfg):
    """The preset on its offline stand-in data, every row kept (the samples are smaller than the recipes')."""
    d = cfg.data
    if d.template == "qa":
        path = RECIPE_DATA["qa"]
    elif d.hub_dataset:
        path = HUB_STAND_INS[d.hub_dataset]
    else:
        path = SAMPLES / d.path.split("/")[-1]
    return cfg.replace({"data.path": str(path), "data.hub_dataset": "", "data.val_samples": 0,
                        "data.val_fraction": 0.0, "data.train_samples": 0})


SHIPPED = sorted(list_presets())


def test_every_shipped_preset_has_a_recipe_here():
    assert {"mistral-7b-finance-fast", "mistral-7b-instruct-thorough", "tiny-demo"} <= set(SHIPPED)
    for name in SHIPPED:
        cfg = load_preset(name)
        assert cfg.data.template in ("alpaca", "qa"), name
        assert cfg.data.path or cfg.data.hub_dataset in HUB_STAND_INS or cfg.data.template == "qa", name


def test_fast_presets_load_the_recipes_dataset_and_say_which_column_fills_which_slot():
    for name in ("mistral-7b-finance-fast",):
        d = load_preset(name).data
        assert d.hub_dataset == "Josephgflowers/Finance-Instruct-500k" and d.split == "train"
        assert d.mapping == {"instruction": "user", "input": "system", "response": "assistant"}
        assert (d.template, d.train_samples, d.val_samples, d.val_fraction, d.seed) == ("alpaca", 20000, 1000, 0.0, 42)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_preset_renders_its_recipe_character_by_character(name, tiny_tokenizer):
    preset = load_preset(name)
    cfg = local_config(preset)
    d = cfg.data
    spec = TemplateSpec.from_config(d)
    sel = select(d, read_records(d.path))
    expected = recipe_rows(preset)
    assert not sel.skipped and len(sel.examples) == len(expected)
    for ex, (want_prompt, want_answer) in zip(sel.examples, expected):
        prompt, answer = render(ex, spec, tiny_tokenizer)
        assert (prompt, answer) == (want_prompt, want_answer)
        # The Playground sends the same prompt (generate.stream -> render_prompt) and stops at the end mark.
        assert render_prompt(ex.instruction, spec, tiny_tokenizer, input=ex.input, system=ex.system) == want_prompt
    if d.template == "qa":
        assert stop_strings(spec) == ["### End"]
    # Both branches of "### Input: omitted when empty" are exercised by the shipped data.
    if d.template == "alpaca":
        assert any("### Input:" in p for p, _ in expected) and any("### Input:" not in p for p, _ in expected)


@pytest.mark.parametrize("name", ["mistral-7b-finance-fast", "mistral-7b-instruct-thorough", "tiny-demo"])
def test_the_tokens_trained_on_spell_the_recipe_text(name, tiny_tokenizer):
    """What the model reads: the ids decode to BOS + the recipe's text + EOS, loss on the answer and EOS."""
    tok = tiny_tokenizer
    preset = load_preset(name)
    cfg = local_config(preset).replace({"data.max_length": 4096, "train.batch_size": 1})
    prep = prepare(cfg, tok)
    expected = set(recipe_rows(preset))
    for ex, row in list(zip(prep.train_examples, prep.train.rows))[:40]:
        prompt, answer = render(ex, TemplateSpec.from_config(cfg.data), tok)
        assert (prompt, answer) in expected
        ids = row["input_ids"]
        assert tok.decode(ids) == tok.bos_token + prompt + answer + tok.eos_token
        n_prompt = sum(1 for x in row["labels"] if x == IGNORE)
        # The loss covers the answer (with the space "### Answer: " ends in, which joins its first word) and EOS;
        # the Playground sends exactly the masked ids, so the tuned model continues where training did.
        assert tok.decode(ids[:n_prompt]) == tok.bos_token + prompt.rstrip(" ")
        assert ids[:n_prompt] == encode_prompt(tok, render_prompt(ex.instruction, TemplateSpec.from_config(cfg.data),
                                                                  tok, input=ex.input, system=ex.system))
    assert prep.stats.count == len(prep.train)


def test_template_texts_shown_in_the_data_tab_are_the_recipes():
    assert describe(TemplateSpec("qa")) == "### Question: {instruction}\n\n### Answer: {response}\n\n### End"
    assert describe(TemplateSpec("alpaca")).startswith(
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{response}")


def test_qa_with_a_system_prompt_or_an_input_keeps_the_blank_lines(tiny_tokenizer):
    from studio.data.schema import Example

    p, a = render(Example(instruction="What is ROI?", input="Gain 5, cost 50", system="Be brief.",
                          response="10%."), TemplateSpec("qa"))
    assert p + a == "Be brief.\n\n### Question: What is ROI?\nGain 5, cost 50\n\n### Answer: 10%.\n\n### End"
    t = tokenize_pair(p, a, tiny_tokenizer, 128)
    assert tiny_tokenizer.decode(t.input_ids) == "<s>" + p + a + "</s>"


def _sentencepiece_legacy_tokenizer():
    """A tokenizer that, like Llama's and Mistral's, prepends a word-start "▁" to every text it encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    rows = read_records(SAMPLES / "finance_alpaca.jsonl")
    corpus = [f"### Instruction:\n{r['instruction']}\n\n### Response:\n{r['output']}" for r in rows]
    corpus += [f"### Question: {r['instruction']}\n\n### Answer: {r['output']}\n\n### End" for r in rows]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # Words start with "▁", and every encoded text gets one in front (sentencepiece's dummy prefix).
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("template", ["alpaca", "qa"])
def test_a_sentencepiece_tokenizer_sees_no_space_the_recipe_does_not_write(template):
    from studio.data.schema import Example

    tok = _sentencepiece_legacy_tokenizer()
    assert tok.decode(tok("Return", add_special_tokens=False)["input_ids"] * 2) == "Return Return"  # the "▁" it adds
    prompt, answer = render(Example(instruction="What is ROI?", response="Return on investment."), TemplateSpec(template))
    t = tokenize_pair(prompt, answer, tok, 128)
    assert tok.decode(t.input_ids) == "<s> " + prompt + answer + "</s>"  # the decoder's usual leading-space strip
    n_prompt = t.labels.count(IGNORE)
    assert t.input_ids[:n_prompt] == encode_prompt(tok, prompt)
    assert tok.decode(t.input_ids[n_prompt:]).lstrip() == answer + "</s>"
