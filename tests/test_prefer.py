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
from studio.config import ConfigError, RunConfig
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
    pair = votes.stage_adapters(stage)
    assert pair == {sft.id: sft.adapter_dir, stage.id: stage.adapter_dir}
    model, tok = load_for_inference(cfg, {"sft": pair[sft.id], "dpo": pair[stage.id]})
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


# ---- every method trains only its adapter, against the SFT adapter as the reference --------------------------

@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_stage_trains_only_the_adapter_and_keeps_the_sft_reference(parent, method, tmp_path, monkeypatch):
    import bitsandbytes.nn.modules as bnb_modules
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from studio.adapters import _disk_name
    from studio.modeling import resolve_base
    from studio.prefer import PreferRecipe

    sft = parent["run"]
    pairs = tmp_path / "pairs.jsonl"
    if method == "kto":  # KTO's own format: single answers labelled good or bad
        _vote_lines(pairs, [{"prompt": p.prompt, "input": p.input, "completion": text, "label": good}
                            for p in unit_pairs(SAMPLES, 12) for text, good in ((p.chosen, True), (p.rejected, False))])
    else:
        write_votes(pairs, unit_pairs(SAMPLES, 12), sft.id)
    cfg = votes.stage_config(sft, method, votes=str(pairs), overrides={"prefer.max_steps": 2,
                                                                      "prefer.batch_size": 4})
    run = parent["store"].create(cfg, f"{method}-in-process")
    r = PreferRecipe(run)
    r.setup()
    frozen = {n: p.detach().clone() for n, p in r.model.named_parameters() if "lora_" not in n}
    buffers = {n: b.detach().clone() for n, b in r.model.named_buffers()}
    r.train()
    r.save()
    for n, p in r.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(frozen[n], p), n
    for n, b in r.model.named_buffers():
        assert torch.equal(buffers[n], b), n
    start = load_file(str(sft.adapter_dir / "adapter_model.safetensors"))
    if method in ("dpo", "kto"):  # the reference is TRL's frozen copy of the SFT adapter, exactly
        ref = {_disk_name(n, "ref"): p for n, p in r.model.named_parameters() if ".ref." in n}
        assert ref.keys() == start.keys()
        assert all(torch.equal(ref[k], start[k]) for k in start)
    else:
        assert not any(".ref." in n for n, _ in r.model.named_parameters())  # ORPO needs no reference
    trained = load_file(str(run.adapter_dir / "adapter_model.safetensors"))
    assert trained.keys() == start.keys() and all(v.dtype == torch.float32 for v in trained.values())
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    r.cleanup()

    data = next(e for e in run.all_events() if e["type"] == "data")
    assert data["train"] == (24 if method == "kto" else 12)
    metrics = [e for e in run.all_events() if e["type"] == "metric"]
    assert metrics and all(isinstance(e["loss"], float) for e in metrics)
    assert {"reward_chosen", "reward_rejected", "logps_chosen"} <= metrics[-1].keys()

    # The stage's adapter loads with plain transformers + peft onto the 4-bit base.
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(resolve_base("studio-tiny-mistral"), quantization_config=q,
                                                device_map="cpu", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run.adapter_dir))
    loaded = {_disk_name(n): p for n, p in model.named_parameters() if "lora_" in n}
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)


# ---- bad input: refused before any weight loads, naming the file, line and field ------------------------------

def _vote_lines(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.mark.parametrize("bad,line,words", [
    ({"rejected": "The ROI is 5%. "}, 3, ["line 3", "'rejected'", "same text as field 'chosen'"]),
    ({"run": "someone-else"}, 3, ["line 3", "'run'", "someone-else", "another run"]),
    ({"base_model": "mistralai/Mistral-7B-v0.1"}, 3, ["line 3", "'base_model'", "another base model"]),
    ({"prompt": "### Instruction:\nWhat is ROI?\n\n### Response:\n"}, 3, ["line 3", "'prompt'", "template text"]),
    ({"prompt": "[INST] What is ROI? [/INST]"}, 3, ["line 3", "'prompt'", "[INST]"]),
    ({"rejected": ""}, 3, ["line 3", "'rejected'", "empty"]),
    ({"chosen": None}, 3, ["line 3", "'chosen'", "missing"]),
    ({"prompt": [{"role": "user", "content": "hi"}]}, 3, ["line 3", "'prompt'", "must be text"]),
    ({"prompt": "How much? " * 150}, 3, ["line 3", "'prompt'", "tokens in the run's template", "prefer.max_length"]),
])
def test_bad_votes_are_refused_by_file_line_and_field(parent, tmp_path, tiny_tokenizer, bad, line, words):
    tokenizer = tiny_tokenizer
    sft = parent["run"]
    good = {"prompt": "What is the ROI?", "chosen": "The ROI is 5%.", "rejected": "The ROI is 5.", "run": sft.id}
    row = {k: v for k, v in {**good, **bad}.items() if v is not None}
    path = _vote_lines(tmp_path / "my_votes.jsonl", [good, good, row] + [good] * 10)
    cfg = votes.stage_config(sft, "dpo", votes=str(path))
    with pytest.raises(DataError) as e:
        votes.load_pairs(cfg, sft, tokenizer=tokenizer)
    msg = str(e.value)
    assert msg.startswith("my_votes.jsonl line 3:"), msg
    for w in words:
        assert w in msg, msg


def test_too_few_pairs_and_wrong_format_are_refused(parent, tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    sft = parent["run"]
    good = {"prompt": "What is the ROI?", "chosen": "The ROI is 5%.", "rejected": "The ROI is 5.", "run": sft.id}
    few = _vote_lines(tmp_path / "few.jsonl", [good] * 5)
    with pytest.raises(DataError, match=r"few.jsonl: 5 usable pairs; .* at least 8 \(prefer.min_pairs\)"):
        votes.load_pairs(votes.stage_config(sft, "dpo", votes=str(few)), sft)
    kto_rows = _vote_lines(tmp_path / "kto.jsonl", [{"prompt": "What is the ROI?", "completion": "5%.",
                                                     "label": True}] * 10)
    with pytest.raises(DataError, match=r"kto.jsonl line 1: a prompt/completion/label row .* dpo needs pairs"):
        votes.load_pairs(votes.stage_config(sft, "dpo", votes=str(kto_rows)), sft)
    assert len(votes.load_pairs(votes.stage_config(sft, "kto", votes=str(kto_rows)), sft).pairs) == 10
    # No votes in the studio yet, none for this run, and a checkpoint the run does not have.
    with pytest.raises(DataError, match="no votes yet"):
        votes.load_pairs(votes.stage_config(sft, "dpo"), sft)
    _vote_lines(tmp_path / "preferences.jsonl", [{**good, "run": "other"}] * 20)
    assert votes.count_pairs(sft) == 0
    with pytest.raises(DataError, match=rf"preferences.jsonl: 0 usable pairs for run '{sft.id}'"):
        votes.load_pairs(votes.stage_config(sft, "dpo"), sft)
    with pytest.raises(ConfigError, match="prefer.parent_checkpoint: .* no complete checkpoint 7"):
        votes.stage_config(sft, "dpo", checkpoint=7)
    # A dataset through prefer.hub_dataset (here a local folder, which load_dataset reads alike): rows by number.
    folder = tmp_path / "hub_pairs"
    folder.mkdir()
    _vote_lines(folder / "train.jsonl", [good] * 3 + [{**good, "rejected": good["chosen"]}] + [good] * 6)
    hub = votes.stage_config(sft, "dpo", overrides={"prefer.hub_dataset": str(folder)})
    with pytest.raises(DataError, match=r"hub_pairs \(train\) row 4: field 'rejected' is the same text"):
        votes.load_pairs(hub, sft)
    _vote_lines(folder / "train.jsonl", [good] * 10)
    assert len(votes.load_pairs(hub, sft).pairs) == 10


def test_cli_prefer_refuses_in_one_line_and_starts_nothing(parent, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STUDIO_HOME", str(parent["home"]))
    sft = parent["run"]
    before = {r.id for r in RunStore().list()}
    row = {"prompt": "What is the ROI?", "chosen": "The ROI is 5%.", "rejected": "The ROI is 5%.", "run": sft.id}
    path = _vote_lines(tmp_path / "same.jsonl", [row] * 10)
    assert cli.main(["prefer", "--run", sft.id, "--votes", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "same.jsonl line 1: field 'rejected' is the same text" in err
    assert cli.main(["prefer", "--run", sft.id, "--votes", str(path), "--set", "prefer.beta=99"]) == 2
    assert "prefer.beta: 99.0 is above the maximum 10.0" in capsys.readouterr().err
    assert cli.main(["prefer", "--run", "no-such-run"]) == 2
    assert "no run named 'no-such-run'" in capsys.readouterr().err
    assert {r.id for r in RunStore().list()} == before


# ---- config and presets -----------------------------------------------------------------------------------------

def test_stage_presets_load_and_hold_only_the_prefer_section():
    from studio.presets import list_presets

    found = votes.stage_presets()
    assert {"dpo-tiny", "dpo-mistral-7b", "orpo-mistral-7b", "kto-mistral-7b"} <= set(found)
    for name, path in found.items():
        cfg = load_preset(path)
        assert cfg.name == name and cfg.prefer.method in ("dpo", "orpo", "kto") and not cfg.prefer.parent_run
        rest = ("model", "lora", "data", "train", "output")  # nothing but the prefer section is set
        assert {k: cfg.to_dict()[k] for k in rest} == {k: RunConfig().to_dict()[k] for k in rest}, name
        assert votes.load_stage_preset(name) == cfg
    assert not set(found) & set(list_presets())  # the SFT presets list stays as it was
    with pytest.raises(ConfigError, match="--preset: no preference-stage preset 'tiny-demo'; known: "):
        votes.load_stage_preset("tiny-demo")


def test_stage_estimate_counts_both_answers_and_the_reference_adapter():
    from studio.estimate import arch_for, estimate

    sft = load_preset("mistral-7b-finance-fast")
    d = sft.to_dict()
    d["prefer"] = {**votes.load_stage_preset("dpo-mistral-7b").to_dict()["prefer"], "parent_run": "sft-run"}
    dpo = type(sft).from_dict(d)
    est, arch = votes.stage_estimate(dpo), arch_for(sft)
    lora = estimate(sft, arch).parts["LoRA + grads + optimizer"]
    assert est.parts["reference adapter"] == lora * 4 // (8 + 2)  # paged_adamw_8bit: 2 bytes of state a weight
    rows = estimate(sft, arch, micro_batch=2 * dpo.prefer.batch_size, seq_len=dpo.prefer.max_length)
    assert est.total == rows.total + est.parts["reference adapter"]
    d["prefer"]["method"] = "orpo"
    assert "reference adapter" not in votes.stage_estimate(type(sft).from_dict(d)).parts


def test_stage_config_is_the_parents_with_the_prefer_section(parent):
    sft = parent["run"]
    cfg = votes.stage_config(sft, "orpo", preset="dpo-tiny", overrides={"prefer.beta": 0.2})
    parent_cfg = sft.config()
    assert (cfg.model, cfg.lora, cfg.data) == (parent_cfg.model, parent_cfg.lora, parent_cfg.data)
    assert (cfg.prefer.method, cfg.prefer.beta, cfg.prefer.learning_rate) == ("orpo", 0.2, 2e-3)
    assert (cfg.prefer.parent_run, cfg.output.adapter_dir, cfg.output.push_to_hub) == (sft.id, "", False)
    with pytest.raises(ConfigError, match="prefer.batch_size: kto"):
        votes.stage_config(sft, "kto", overrides={"prefer.batch_size": 1})
    with pytest.raises(ConfigError, match="prefer.method: 'ppo' is not one of dpo, orpo, kto"):
        votes.stage_config(sft, "ppo")


# ---- the run machinery: stop, resume, NaN halt ------------------------------------------------------------------

def _stage(parent, tmp_path, name, **overrides):
    pairs = tmp_path / f"{name}.jsonl"
    write_votes(pairs, unit_pairs(SAMPLES, 16), parent["run"].id)
    ov = {"prefer.max_steps": 4, "prefer.batch_size": 4, "prefer.save_steps": 1, "train.logging_steps": 1,
          **overrides}
    return parent["store"].create(votes.stage_config(parent["run"], "dpo", votes=str(pairs), overrides=ov), name)


def _losses(run) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in run.all_events() if e["type"] == "metric"}


def test_stopped_stage_resumes_to_the_straight_result(parent, tmp_path):
    from safetensors.torch import load_file

    from studio.prefer import PreferRecipe

    straight = _stage(parent, tmp_path, "dpo-straight")
    assert PreferRecipe(straight).execute() == "completed"
    run = _stage(parent, tmp_path, "dpo-stopped")
    run.stop_flag.touch()  # a cooperative stop: the worker keeps the step it finished
    assert PreferRecipe(run).execute() == "stopped"
    assert run.last_checkpoint().name == "checkpoint-1" and not (run.adapter_dir / "adapter_model.safetensors").exists()
    run.stop_flag.unlink()
    assert PreferRecipe(run).execute(resume=True) == "completed"
    assert (run.dir / votes.PAIRS_FILE).read_text() == (straight.dir / votes.PAIRS_FILE).read_text()
    a, b = _losses(straight), _losses(run)
    assert sorted(b) == [1, 2, 3, 4]
    for s in (2, 3, 4):
        assert abs(a[s] - b[s]) <= 1e-4, (s, a[s], b[s])
    wa, wb = (load_file(str(r.adapter_dir / "adapter_model.safetensors")) for r in (straight, run))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_nan_loss_halts_the_stage_and_a_new_stage_starts_from_its_last_good_checkpoint(parent, tmp_path,
                                                                                       monkeypatch):
    from studio.prefer import PreferRecipe

    monkeypatch.setenv("STUDIO_FAULTS", "nan@3")
    run = _stage(parent, tmp_path, "dpo-nan")
    assert PreferRecipe(run).execute() == "halted"
    last = run.last_status()
    assert "NaN" in last["message"] and last["step"] == 3
    assert [p.name for p in run.checkpoints()] == ["checkpoint-1", "checkpoint-2"]
    assert not (run.adapter_dir / "adapter_model.safetensors").exists()

    # --checkpoint: an ORPO stage on top of the halted DPO stage's checkpoint 2 (stages stack).
    monkeypatch.delenv("STUDIO_FAULTS")
    pairs = tmp_path / "more.jsonl"
    write_votes(pairs, unit_pairs(SAMPLES, 8), run.id)
    cfg = votes.stage_config(run, "orpo", checkpoint=2, votes=str(pairs), overrides={"prefer.max_steps": 1})
    nxt = parent["store"].create(cfg, "orpo-on-checkpoint")
    assert PreferRecipe(nxt).execute() == "completed"
    assert votes.stage_adapters(nxt) == {run.id: run.checkpoints_dir / "checkpoint-2", nxt.id: nxt.adapter_dir}
    start = next(e for e in nxt.all_events() if e.get("status") == "starting")
    assert (start["parent_run"], start["adapter"]) == (run.id, "checkpoints/checkpoint-2")
