"""Evaluate a finished run on its held-out validation examples, base against tuned.

Contract: ``evaluate_run(run, limit)`` loads the base model once with the run's adapter, and for the
base (adapter disabled) and the tuned model computes the mean loss and perplexity over the
validation examples (loss on response tokens, as in training) and, on greedy answers, exact match
and ROUGE-L F1 against the references.  Returns an ``Evaluation`` (also written to
``<run>/evaluation.json`` and as an ``evaluation`` event) with per-example rows so the UI can show
the best and worst.  A preference stage is measured against the adapter it started from instead of the base
(``Evaluation.labels`` names the two sides, e.g. ``sft`` and ``dpo``), so SFT and preference answers are
compared on the same examples.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field

from studio.playground import stage_start
from studio.runs import Run, RunStore


@dataclass
class Evaluation:
    n: int
    base: dict
    tuned: dict
    rows: list[dict] = field(default_factory=list)
    # What the two sides are: the base model and the run's adapter, or for a preference stage the adapter it
    # started from ("sft") and its own ("dpo", ...); ``base``/``tuned`` keep their keys either way.
    labels: dict = field(default_factory=lambda: {"base": "base", "tuned": "tuned"})

    def table(self) -> list[list]:
        keys = [("loss", "loss"), ("perplexity", "perplexity"), ("exact_match", "exact match"),
                ("rouge_l", "ROUGE-L F1")]
        return [[label, round(self.base[k], 4), round(self.tuned[k], 4)] for k, label in keys]

    def best_worst(self, k: int = 3) -> tuple[list[dict], list[dict]]:
        rows = sorted(self.rows, key=lambda r: r["tuned_rouge_l"], reverse=True)
        return rows[:k], rows[-k:][::-1]


def _norm(s: str) -> str:
    return " ".join(s.lower().strip().rstrip(".").split())


def rouge_l(pred: str, ref: str) -> float:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure


def _loss(model, toks, device) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for t in toks:
            ids = torch.tensor([t.input_ids], device=device)
            labels = torch.tensor([t.labels], device=device)
            n = int((labels[:, 1:] != -100).sum())
            if n == 0:
                continue
            out = model(input_ids=ids, labels=labels)
            total += float(out.loss) * n
            count += n
    return total / max(count, 1)


def evaluate_run(run: Run, limit: int = 50, max_new_tokens: int = 64, adapter_path=None) -> Evaluation:
    from studio.data.pipeline import tokenize_examples, train_val_examples
    from studio.data.templates import TemplateSpec
    from studio.generate import generate_text
    from studio.modeling import load_for_inference

    cfg = run.config()
    path = adapter_path or run.adapter_dir
    adapters, labels = {"tuned": path}, {"base": "base", "tuned": "tuned"}
    start = stage_start(run, RunStore(run.dir.parent)) if adapter_path is None else {}
    if start:  # a preference stage is measured against the adapter it started from, not the bare base
        (name, start_path), = start.items()
        adapters["start"] = start_path
        labels = {"base": name, "tuned": cfg.prefer.method}
    model, tok = load_for_inference(cfg, adapters)
    tok.padding_side = "right"
    train, val = train_val_examples(cfg.data)
    val = (val or train)[:limit]
    spec = TemplateSpec.from_config(cfg.data)
    toks = tokenize_examples(val, spec, tok, cfg.data.max_length, False)
    device = next(model.parameters()).device
    model.eval()
    result: dict[str, dict] = {}
    answers: dict[str, list[str]] = {}
    for name in ("base", "tuned"):
        side = "start" if name == "base" and start else name
        if side != "base":
            model.set_adapter(side)
        with model.disable_adapter() if side == "base" else contextlib.nullcontext():
            loss = _loss(model, toks, device)
            answers[name] = [generate_text(model, tok, ex.instruction, spec, input=ex.input, system=ex.system,
                                           max_new_tokens=max_new_tokens) for ex in val]
        em = sum(_norm(a) == _norm(ex.response) for a, ex in zip(answers[name], val)) / len(val)
        rl = sum(rouge_l(a, ex.response) for a, ex in zip(answers[name], val)) / len(val)
        result[name] = {"loss": loss, "perplexity": math.exp(min(loss, 50)), "exact_match": em, "rouge_l": rl}
    rows = [{"prompt": ex.instruction, "input": ex.input, "reference": ex.response, "base": b, "tuned": t,
             "tuned_rouge_l": rouge_l(t, ex.response)} for ex, b, t in zip(val, answers["base"], answers["tuned"])]
    ev = Evaluation(len(val), result["base"], result["tuned"], rows, labels)
    (run.dir / "evaluation.json").write_text(json.dumps(asdict(ev), indent=1))
    run.emit("evaluation", n=ev.n, base=ev.base, tuned=ev.tuned)
    return ev
