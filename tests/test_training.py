"""The real QLoRA path on the CPU: NF4 base (bitsandbytes), LoRA, Trainer, run folders, worker.

One demo run (the shipped tiny-demo preset, ~2 minutes on 2 cores) feeds most assertions; stop and
resume use short runs in the worker process, as the UI does.
"""

from __future__ import annotations

import time

import pytest
import torch

from studio import export, worker
from studio.data.templates import TemplateSpec
from studio.generate import generate_text
from studio.modeling import load_for_inference, resolve_base
from studio.presets import load_preset
from studio.runs import RunStore
from studio.training import Recipe

PROBE = ["Calculate the ROI for a cost of $7,500 and a final value of $19,500.",
         "What is the simple interest on $1,000 at 5% per year for 3 years?"]


def _batch(tok):
    enc = tok(["### Instruction:\nCompute ROI.\n\n### Response:\nThe ROI is", "Hello world"],
              return_tensors="pt", padding=True)
    return enc


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the tiny-demo preset step by step, keeping what the assertions need."""
    import os

    os.environ["STUDIO_HOME"] = str(tmp_path_factory.mktemp("demo_home"))
    cfg = load_preset("tiny-demo")
    run = RunStore().create(cfg)
    r = Recipe(run)
    r.setup()
    before = _base_weights(r.model)
    quant_before = {n: b.detach().clone() for n, b in r.model.named_buffers()}
    t0 = time.time()
    r.train()
    r.save()
    seconds = time.time() - t0
    after = _base_weights(r.model)
    quant_after = {n: b.detach().clone() for n, b in r.model.named_buffers()}
    r.model.eval()
    enc = _batch(r.tokenizer)
    with torch.no_grad():
        logits = r.model(**enc).logits.clone()
    run.emit("status", status="completed", step=r.trainer.state.global_step)
    r.cleanup()
    return dict(run=run, cfg=cfg, before=before, after=after, quant_before=quant_before, quant_after=quant_after,
                logits=logits, enc=enc, seconds=seconds)


def test_demo_loss_falls(demo):
    evs = demo["run"].all_events()
    losses = [e["loss"] for e in evs if e["type"] == "metric"]
    evals = [e["eval_loss"] for e in evs if e["type"] == "eval"]
    assert len(losses) > 5 and len(evals) >= 2
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first * 0.7, (first, last)
    assert evals[-1] < evals[0]
    assert any(e["type"] == "sample" for e in evs)
    assert any(e["type"] == "checkpoint" for e in evs)


def test_base_weights_bit_identical_and_lora_changed(demo):
    before, after = demo["before"], demo["after"]
    assert before.keys() == after.keys()
    for n in before:
        assert torch.equal(before[n], after[n]), n
    for n in demo["quant_before"]:
        assert torch.equal(demo["quant_before"][n], demo["quant_after"][n]), n


def test_adapter_loads_with_plain_peft_and_same_logits(demo, monkeypatch):
    import bitsandbytes.nn.modules as bnb_modules
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    # A plain load on a CPU with AVX-512 BF16 would answer through bitsandbytes' bf16 inference kernel, other
    # numbers by design; the path the run trained and evaluated on is the one every CPU has
    # (tests/test_cpu_4bit_paths.py shows the studio's own loads keep to it on both kinds of CPU).
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)

    adir = str(demo["run"].adapter_dir)
    tok = AutoTokenizer.from_pretrained(adir)
    assert tok.pad_token_id == demo["enc"]["input_ids"][1, -1].item() or tok.pad_token is not None
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(resolve_base("studio-tiny-mistral"), quantization_config=q,
                                                device_map="cpu", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adir).eval()
    with torch.no_grad():
        logits = model(**demo["enc"]).logits
    torch.testing.assert_close(logits, demo["logits"], rtol=0, atol=1e-5)
    lora = [n for n, p in model.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_tuned_answers_change_and_follow_the_format(demo):
    cfg, run = demo["cfg"], demo["run"]
    model, tok = load_for_inference(cfg, {"tuned": run.adapter_dir})
    spec = TemplateSpec.from_config(cfg.data)
    base = [generate_text(model, tok, p, spec, adapter=None, max_new_tokens=30) for p in PROBE]
    tuned = [generate_text(model, tok, p, spec, adapter="tuned", max_new_tokens=30) for p in PROBE]
    assert base != tuned
    assert all(t.startswith("The ") for t in tuned), tuned


def test_merge_equals_adapter_on(demo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = demo["run"]
    out = export.merge(run)
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(resolve_base("studio-tiny-mistral"), dtype=torch.float32)
    on = PeftModel.from_pretrained(base, str(run.adapter_dir)).eval()
    with torch.no_grad():
        a = merged(**demo["enc"]).logits
        b = on(**demo["enc"]).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_adapter_zip_and_snippet(demo):
    import zipfile

    z = export.adapter_zip(demo["run"])
    names = zipfile.ZipFile(z).namelist()
    assert any(n.endswith("adapter_model.safetensors") for n in names)
    assert any(n.endswith("tokenizer.json") for n in names)
    assert "PeftModel.from_pretrained" in export.load_snippet(demo["run"])


# ---- worker: stop and resume ---------------------------------------------------------------------

def _short_cfg(steps=16, save=4):
    return load_preset("tiny-demo").replace({
        "train.max_steps": steps, "train.save_steps": save, "train.eval_steps": 0, "train.logging_steps": 1,
        "train.sample_prompts": 0, "train.save_total_limit": 10, "train.batch_size": 4})


def _wait_step(run, step, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        steps = [e["step"] for e in run.all_events() if e["type"] == "metric"]
        if steps and max(steps) >= step:
            return
        assert run.last_status()["status"] not in ("failed", "completed"), run.last_status()
        time.sleep(0.2)
    raise AssertionError("run did not reach the step in time")


def _losses(run):
    out = {}
    for e in run.all_events():
        if e["type"] == "metric":
            out[e["step"]] = e["loss"]
    return out


def test_stop_mid_run_then_resume_matches_straight_run():
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    store = RunStore()
    straight = worker.start(store, _short_cfg().replace({"train.tensorboard": True}), "straight")
    assert worker.wait(straight, timeout=600) == "completed", straight.last_status()
    assert list(straight.dir.rglob("events.out.tfevents.*")), "TensorBoard logging writes event files"

    run = worker.start(store, _short_cfg(), "stopped-then-resumed")
    _wait_step(run, 5)
    t = time.time()
    assert worker.stop(run, grace=60) == "stopped"
    assert time.time() - t < 30
    assert not run.worker_alive()
    ck = run.last_checkpoint()
    assert ck is not None
    stopped_at = int(ck.name.split("-")[1])
    assert 5 <= stopped_at < 16
    base = AutoModelForCausalLM.from_pretrained(resolve_base("studio-tiny-mistral"), dtype=torch.float32)
    PeftModel.from_pretrained(base, str(ck))  # the last checkpoint is complete and loadable

    worker.resume(store, run)
    assert worker.wait(run, timeout=600) == "completed", run.last_status()
    a, b = _losses(straight), _losses(run)
    after = [s for s in sorted(a) if s > stopped_at]
    assert after, (stopped_at, sorted(a))
    for s in after:
        assert abs(a[s] - b[s]) <= 1e-4, (s, a[s], b[s])


def test_one_training_at_a_time():
    store = RunStore()
    run = worker.start(store, _short_cfg(steps=200, save=100), "long")
    try:
        with pytest.raises(worker.Busy):
            worker.start(store, _short_cfg(), "second")
    finally:
        worker.stop(run, grace=30)
    assert not run.worker_alive()


def test_evaluation_samples_answer_as_one_prompt_at_a_time(tiny_model_dir):
    """The run's sample answers come from one batched, left-padded generate: each equals the answer the prompt gets
    alone (greedy), inputs of different lengths included."""
    from studio import modeling
    from studio.data.files import read_records
    from studio.data.pipeline import select
    from studio.data.templates import TemplateSpec
    from studio.generate import generate_texts
    from studio.presets import load_preset

    cfg = load_preset("tiny-demo").replace({"model.base_model": str(tiny_model_dir)})
    model, tok = modeling.load_for_inference(cfg)
    spec = TemplateSpec.from_config(cfg.data)
    examples = select(cfg.data, read_records(cfg.data.path)).examples[:4]
    assert len({len(ex.instruction + ex.input) for ex in examples}) > 1
    alone = [generate_text(model, tok, ex.instruction, spec, input=ex.input, system=ex.system, max_new_tokens=24)
             for ex in examples]
    assert generate_texts(model, tok, examples, spec, 24) == alone


def test_a_run_without_gradient_clipping_trains(tmp_path):
    """train.max_grad_norm 0 turns clipping off (Trainer 5 compares the norm with 0: it must not be None)."""
    cfg = load_preset("tiny-demo").replace({"train.max_grad_norm": 0.0, "train.max_steps": 2, "train.eval_steps": 0,
                                            "train.save_steps": 0, "train.sample_prompts": 0})
    run = RunStore(tmp_path / "runs").create(cfg)
    assert Recipe(run).execute() == "completed", run.last_status()
    assert [e["step"] for e in run.all_events() if e["type"] == "metric"][-1] == 2


def test_graphed_samples_that_fail_turn_off_with_a_note_and_the_run_goes_on(tmp_path, monkeypatch):
    """Sample answers watch a run and never end it: when graphed decoding raises (here injected: on the CPU it is
    never attempted), the recipe writes one note, turns it off for the rest of the run, and generate answers."""
    from studio import generate
    from studio.runs import RunStore
    from studio.training import Recipe

    run = RunStore(tmp_path / "runs").create(_short_cfg().replace({"train.sample_prompts": 2}), "graphed-fails")
    recipe = Recipe(run)
    recipe.setup()
    assert recipe.graphed_samples is False  # the CPU's plan: graph_decode needs a CUDA GPU
    recipe.graphed_samples = True
    real, calls = generate.generate_texts, []

    def graphed_fails(*args, graphed=False):
        calls.append(graphed)
        if graphed:
            raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors ...")
        return real(*args)

    monkeypatch.setattr(generate, "generate_texts", graphed_fails)
    recipe.emit_samples(recipe.model, 1)
    recipe.emit_samples(recipe.model, 2)
    assert calls == [True, False, False]
    evs = run.all_events()
    notes = [e["message"] for e in evs if e["type"] == "log" and "Graphed sample answers" in e["message"]]
    assert len(notes) == 1 and "(operation not permitted when stream is capturing)" in notes[0]
    samples = [e for e in evs if e["type"] == "sample"]
    assert [e["step"] for e in samples] == [1, 1, 2, 2] and all(isinstance(e["answer"], str) for e in samples)


def test_sample_answers_leave_what_is_learned_alone(tmp_path):
    """Samples watch a run: with LoRA dropout (which draws from the global random state) a run that writes sample
    answers at each evaluation logs the losses of the same run without them, step for step."""
    from studio.runs import RunStore
    from studio.training import Recipe

    store = RunStore(tmp_path / "runs")
    losses = {}
    for n in (2, 0):
        cfg = _short_cfg(steps=8, save=0).replace({"lora.dropout": 0.1, "train.eval_steps": 3,
                                                   "train.sample_prompts": n})
        run = store.create(cfg, f"samples-{n}")
        assert Recipe(run).execute() == "completed", run.last_status()
        evs = run.all_events()
        assert bool([e for e in evs if e["type"] == "sample"]) == (n > 0)
        losses[n] = [(e["step"], e["loss"]) for e in evs if e["type"] == "metric"]
    assert len(losses[2]) == 8 and losses[2] == losses[0]
