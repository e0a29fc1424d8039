"""Measure the ``tiny-demo`` preset end to end: build, train, and compare base vs tuned answers.

Runs the real engine path (``Recipe(run).execute()``) and then answers training prompts with the
base weights and with the tuned adapter, using ``model.generate`` directly so it can tell whether a
generation *stopped* (emitted EOS) or ran out of ``max_new_tokens``.

    PYTHONPATH=. .venv/bin/python scripts/tiny_demo_check.py [--home /tmp/tinyexp] [--model-dir DIR]
        [--force-build] [--set train.learning_rate=5e-3 ...] [--prompts 10] [--json OUT.json]

``--model-dir`` sets ``STUDIO_TINY_MODEL_DIR`` (default: the repo's ``models/tiny-mistral``), so
experiments do not disturb the shared build.  Prints a summary and exits non-zero when the run did
not complete or when the tuned model does not beat the base on format + stop.

Counted per prompt (greedy, ``--max-new-tokens`` 40):
- ``stopped``: EOS was generated before ``max_new_tokens``;
- ``format``: the answer is one sentence in the trained style (``The ... is ...`` / ``A ... is ...``
  / ``It takes ...`` / ``54.00 AUD is ... USD.``): one line, starts with a capital or a digit, ends
  with ``.``, has 3-30 words including ``is``/``are``/``takes``, no template markers;
- ``prefix``: the answer's words before the first number equal the reference's (same answer type);
- ``shape``: the answer equals the reference once every number is replaced by a placeholder
  (``The ROI is <N>.``): same answer type and a well-formed sentence, only the figure differs;
- ``exact``: the answer equals the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _prefix(s: str) -> str:
    m = re.search(r"[-+$\d]", s)
    return (s[: m.start()] if m else s).strip()


def _shape(s: str) -> str:
    return re.sub(r"[-+]?\$?\d[\d,]*(\.\d+)?", "<N>", s.strip())


def _format_ok(ans: str) -> bool:
    return ("\n" not in ans and ans.endswith(".") and "###" not in ans and 3 <= len(ans.split()) <= 30
            and (ans[:1].isupper() or ans[:1].isdigit()) and bool(re.search(r"\b(is|are|takes)\b", ans)))


def answer(model, tok, spec, ex, adapter, max_new_tokens):
    import torch

    from studio.generate import Sampling, _adapter_ctx, _cut, _gen_kwargs, _inputs
    from studio.data.templates import render_prompt

    prompt = render_prompt(ex.instruction, spec, tok, system=ex.system, input=ex.input)
    enc = _inputs(model, tok, prompt)
    with _adapter_ctx(model, adapter), torch.no_grad():
        out = model.generate(**enc, **_gen_kwargs(tok, Sampling(max_new_tokens)))
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    stopped = tok.eos_token_id in new
    text = _cut(tok.decode(new, skip_special_tokens=True), spec).strip()
    return {"answer": text, "stopped": stopped, "new_tokens": len(new), "reference": ex.response,
            "format": _format_ok(text), "prefix": _prefix(text) == _prefix(ex.response),
            "shape": _shape(text) == _shape(ex.response), "exact": text == ex.response.strip()}


def score(rows):
    return {k: sum(r[k] for r in rows) for k in ("stopped", "format", "prefix", "shape", "exact")} | {
        "format_and_stopped": sum(r["stopped"] and r["format"] for r in rows),
        "shape_and_stopped": sum(r["stopped"] and r["shape"] for r in rows), "n": len(rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default="/tmp/tinyexp")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--force-build", action="store_true")
    ap.add_argument("--preset", default="tiny-demo")
    ap.add_argument("--set", action="append", default=[], help="dotted.key=yaml_value")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--show", type=int, default=4, help="print this many base/tuned answer pairs")
    ap.add_argument("--json", default=None)
    ap.add_argument("--pretrain", action="append", default=[],
                    help="experiment: override tiny_model.PRETRAIN[key]=value (use with --model-dir)")
    ap.add_argument("--dims", action="append", default=[],
                    help="experiment: override tiny_model.MODEL_DIMS[key]=value (use with --model-dir)")
    ap.add_argument("--build-only", action="store_true")
    a = ap.parse_args(argv)

    os.environ["STUDIO_HOME"] = a.home
    if a.model_dir:
        os.environ["STUDIO_TINY_MODEL_DIR"] = str(Path(a.model_dir).resolve())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)

    import yaml

    from studio.config import RunConfig
    from studio.data.pipeline import load_raw, resolve_mapping, split, to_examples
    from studio.data.templates import TemplateSpec
    from studio.modeling import load_for_inference
    from studio.presets import load_preset
    from studio.runs import RunStore
    from studio import tiny_model
    from studio.tiny_model import build_tiny_model, default_tiny_model_dir
    from studio.training import Recipe

    for target, items in ((tiny_model.PRETRAIN, a.pretrain), (tiny_model.MODEL_DIMS, a.dims)):
        for item in items:
            key, val = item.split("=", 1)
            target[key] = yaml.safe_load(val)
    t = time.perf_counter()
    build_tiny_model(default_tiny_model_dir(), force=a.force_build)
    build_s = time.perf_counter() - t
    marker = json.loads((default_tiny_model_dir() / tiny_model.MARKER_FILE).read_text())
    print(f"model {default_tiny_model_dir()}: {time.perf_counter() - t:.1f}s, pretrain {marker.get('pretrain')}")
    if a.build_only:
        return 0

    cfg = load_preset(a.preset)
    if a.set:
        d = cfg.to_dict()
        for item in a.set:
            key, val = item.split("=", 1)
            sec, name = key.split(".", 1)
            d[sec][name] = yaml.safe_load(val)
        cfg = RunConfig.from_dict(d)

    run = RunStore().create(cfg)
    load_before = os.getloadavg()
    t, c = time.perf_counter(), time.process_time()
    status = Recipe(run).execute()
    train_s, train_cpu_s = time.perf_counter() - t, time.process_time() - c
    ev = run.all_events()
    metrics = [e for e in ev if e["type"] == "metric"]
    evals = [e for e in ev if e["type"] == "eval"]
    samples = [e for e in ev if e["type"] == "sample"]
    last_status = [e for e in ev if e["type"] == "status"][-1]

    model, tok = load_for_inference(cfg, {"tuned": run.adapter_dir})
    spec = TemplateSpec.from_config(cfg.data)
    records = load_raw(cfg.data)
    _, mapping = resolve_mapping(records, cfg.data.mapping)
    examples, _ = to_examples(records, mapping)
    train_ex, _ = split(examples, cfg.data)
    val_records = [json.loads(x) for x in (REPO / "samples/finance_alpaca_val.jsonl").read_text().splitlines() if x]
    heldout, _ = to_examples(val_records, mapping)

    res = {}
    for name, exs in (("train", train_ex[: a.prompts]), ("heldout", heldout[: a.prompts])):
        res[name] = {ad or "base": [answer(model, tok, spec, ex, ad, a.max_new_tokens) for ex in exs]
                     for ad in (None, "tuned")}

    out = {
        "status": status, "last_status": last_status, "build_s": round(build_s, 2), "train_s": round(train_s, 1),
        "train_cpu_s": round(train_cpu_s, 1), "load_before": load_before,
        "steps": metrics[-1]["step"] if metrics else 0,
        "train_loss": [metrics[0]["loss"], metrics[-1]["loss"]] if metrics else None,
        "eval_loss": [e["eval_loss"] for e in evals],
        "threads": __import__("torch").get_num_threads(),
        "score": {k: {ad: score(rows) for ad, rows in v.items()} for k, v in res.items()},
        "last_samples": [{"answer": s["answer"], "reference": s["reference"]} for s in samples[-2:]],
        "answers": res, "overrides": a.set, "pretrain": marker.get("pretrain"), "pretrain_cfg": tiny_model.PRETRAIN,
        "dims": tiny_model.MODEL_DIMS, "load": os.getloadavg(),
    }
    print(f"loadavg before {load_before} after {os.getloadavg()}; execute() used {train_cpu_s:.0f}s CPU")
    print(f"status={status} build={build_s:.1f}s train={train_s:.1f}s steps={out['steps']} "
          f"loss {out['train_loss']} eval {[round(x, 3) for x in out['eval_loss']]}")
    for k, v in out["score"].items():
        for ad, s in v.items():
            print(f"  {k:8s} {ad:6s} {s}")
    for i in range(min(a.show, a.prompts)):
        b, tu = res["train"]["base"][i], res["train"]["tuned"][i]
        print(f"  ref  : {b['reference']}\n  base : {b['answer'][:120]!r} stop={b['stopped']}\n"
              f"  tuned: {tu['answer'][:120]!r} stop={tu['stopped']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    s = out["score"]["train"]
    ok = status == "completed" and s["tuned"]["format_and_stopped"] > s["base"]["format_and_stopped"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
