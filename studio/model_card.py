"""Model cards: a ``README.md`` with Hub metadata that says how a run's model was made and how to load it.

Contract:
- ``facts(run)`` gathers the card's numbers from the run folder only (config, ``events.jsonl``,
  ``evaluation.json``, GGUF checks): base model and revision, dataset name, sha256 and counts, template, every
  hyperparameter, hardware and time, final training and validation loss, the Evaluate table, the GGUF checks.
- ``write(run, folder, kind)`` writes ``folder/README.md`` (``huggingface_hub``'s ``ModelCard`` with
  ``ModelCardData``) and ``folder/loss_curve.png`` (drawn with Pillow); ``kind`` is ``adapter``, ``merged`` or
  ``gguf`` and picks the metadata (library) and the loading instructions first shown.  Returns the card's path.
- Sections, in order: Model, Data, Prompt template, Hyperparameters, Training, Evaluation, GGUF check, How to use
  (transformers + peft, transformers, llama.cpp, Ollama).  A section with nothing to say says so.
Never imports gradio.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from studio.runs import Run

KINDS = ("adapter", "merged", "gguf")
SECTIONS = ("Model", "Data", "Prompt template", "Hyperparameters", "Training", "Evaluation", "GGUF check",
            "How to use")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _base_revision(cfg) -> str:
    from studio.modeling import TINY

    if cfg.model.base_model == TINY:
        from studio.tiny_model import default_tiny_model_dir

        marker = default_tiny_model_dir() / "tiny_model.json"
        if marker.exists():
            return "fingerprint " + json.loads(marker.read_text()).get("fingerprint", "?")[:16]
    return cfg.model.revision


def gguf_checks(run: Run) -> list[dict]:
    folder = run.dir / "export" / "gguf"
    out = []
    for p in sorted(folder.glob("*.check.json")) if folder.exists() else []:
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    order = {"f16": 0, "q8_0": 1, "q4_k_m": 2}
    return sorted(out, key=lambda c: order.get(c.get("kind"), 9))


def facts(run: Run) -> dict:
    from studio.data.templates import TemplateSpec, describe
    from studio.paths import shipped_file

    cfg = run.config()
    evs = run.all_events()
    metrics = [e for e in evs if e.get("type") == "metric" and isinstance(e.get("loss"), (int, float))]
    evals = [e for e in evs if e.get("type") == "eval"]
    data = next((e for e in reversed(evs) if e.get("type") == "data"), {})
    starting = next((e for e in reversed(evs) if e.get("type") == "status" and e.get("status") == "starting"), {})
    running = [e for e in evs if e.get("type") == "status" and e.get("status") == "running"]
    done = next((e for e in reversed(evs) if e.get("type") == "status" and e.get("status") == "completed"), None)
    end_t = done["t"] if done else (evs[-1]["t"] if evs else None)
    files = []
    for key in ("path", "val_path"):
        value = getattr(cfg.data, key)
        if value:
            p = shipped_file(value)
            files.append({"role": "train" if key == "path" else "validation", "name": Path(value).name,
                          "sha256": _sha256(p) if p.is_file() else None})
    evaluation = None
    ev_path = run.dir / "evaluation.json"
    if ev_path.exists():
        try:
            ev = json.loads(ev_path.read_text())
            evaluation = {"n": ev.get("n"), "base": ev.get("base", {}), "tuned": ev.get("tuned", {})}
        except (OSError, ValueError):
            evaluation = None
    hyper = {}
    for section in ("model", "lora", "data", "train"):
        for k, v in vars(getattr(cfg, section)).items():
            if section == "data" and k in ("path", "val_path"):
                v = Path(v).name if v else v  # a server path says nothing to a reader of the card
            hyper[f"{section}.{k}"] = v
    return {
        "run": run.id,
        "preset": cfg.name,
        "base_model": cfg.model.base_model,
        "base_revision": _base_revision(cfg),
        "quantization": cfg.model.quantization,
        "dataset": cfg.data.hub_dataset or (Path(cfg.data.path).name if cfg.data.path else ""),
        "dataset_files": files,
        "hub_dataset": cfg.data.hub_dataset or None,
        "train_examples": data.get("train"),
        "validation_examples": data.get("validation"),
        "skipped_examples": data.get("skipped"),
        "template": cfg.data.template,
        "template_text": describe(TemplateSpec.from_config(cfg.data)),
        "hyperparameters": hyper,
        "device": starting.get("device"),
        "gpu": starting.get("gpu"),
        "num_gpus": cfg.train.num_gpus,
        "steps": max((e["step"] for e in evs if e.get("type") in ("metric", "eval", "status")
                      and isinstance(e.get("step"), int)), default=0),
        "final_train_loss_step": metrics[-1]["step"] if metrics else None,
        "final_validation_loss_step": evals[-1]["step"] if evals else None,
        "train_seconds": round(end_t - running[0]["t"], 1) if running and end_t else None,
        "final_train_loss": metrics[-1]["loss"] if metrics else None,
        "final_validation_loss": evals[-1]["eval_loss"] if evals else None,
        "losses": [(e["step"], e["loss"]) for e in metrics],
        "eval_losses": [(e["step"], e["eval_loss"]) for e in evals],
        "evaluation": evaluation,
        "gguf": gguf_checks(run),
    }


# ---- loss curve ---------------------------------------------------------------------------------------------
def loss_curve_png(f: dict, path: Path, size: tuple[int, int] = (640, 360)) -> Path | None:
    """Training (blue) and validation (orange) loss by step, drawn with Pillow (matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw

    pts = [(s, l) for s, l in f["losses"] if math.isfinite(l)]
    evp = [(s, l) for s, l in f["eval_losses"] if math.isfinite(l)]
    if not pts and not evp:
        return None
    w, h = size
    left, right, top, bottom = 56, 16, 28, 36
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    allp = pts + evp
    x0, x1 = min(s for s, _ in allp), max(s for s, _ in allp)
    y0, y1 = min(v for _, v in allp), max(v for _, v in allp)
    if x1 == x0:
        x1 = x0 + 1
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def xy(s, v):
        return (left + (s - x0) / (x1 - x0) * (w - left - right), top + (y1 - v) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="#888")
    for i in range(5):
        v = y0 + (y1 - y0) * i / 4
        _, y = xy(x0, v)
        d.line([left, y, w - right, y], fill="#eee")
        d.text((4, y - 6), f"{v:.3f}", fill="#333")
    d.text((left, h - bottom + 6), f"step {x0}", fill="#333")
    d.text((w - right - 70, h - bottom + 6), f"step {x1}", fill="#333")
    d.text((left, 6), "training loss", fill="#1f77b4")
    d.text((left + 110, 6), "validation loss", fill="#ff7f0e")
    if len(pts) > 1:
        d.line([xy(s, v) for s, v in pts], fill="#1f77b4", width=2)
    for s, v in pts[-1:] if len(pts) == 1 else []:
        x, y = xy(s, v)
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill="#1f77b4")
    if len(evp) > 1:
        d.line([xy(s, v) for s, v in evp], fill="#ff7f0e", width=2)
    for s, v in evp:
        x, y = xy(s, v)
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill="#ff7f0e")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=True)
    return path


# ---- the card -----------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
    if isinstance(v, (list, dict)):
        return json.dumps(v) if v else "—"
    s = str(v)
    return s.replace("|", "\\|").replace("\n", "\\n") if s else "—"


def _duration(seconds) -> str:
    if seconds is None:
        return "—"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def usage(run: Run, kind: str, f: dict, repo: str | None = None) -> str:
    """How to load it: transformers + peft, transformers (merged), llama.cpp and Ollama; this folder's kind first."""
    base = f["base_model"]
    where = repo or "PATH_TO_THIS_FOLDER"
    folder = run.dir / "export" / "gguf"
    gguf_files = sorted(p.name for p in folder.glob("*.gguf")) if folder.exists() else []
    gguf_name = gguf_files[-1] if gguf_files else f"{run.id}-q4_k_m.gguf"
    name = ollama_name(run.id)
    blocks = {
        "adapter": ["### transformers + peft (the adapter)", "", "```python",
                    "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                    f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                    f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
                    f'model = PeftModel.from_pretrained(base, "{where}")', "```"],
        "merged": ["### transformers (the merged model)", "", "```python",
                   "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                   f'model = AutoModelForCausalLM.from_pretrained("{where}")',
                   f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```"],
        "gguf": ["### llama.cpp", "", "```bash", f'llama-cli -m {gguf_name} -p "..." -n 128 --temp 0', "```", "",
                 "From Python (llama-cpp-python):", "", "```python", "from llama_cpp import Llama", "",
                 f'llm = Llama(model_path="{gguf_name}")',
                 'out = llm.create_chat_completion([{"role": "user", "content": "..."}])',
                 'print(out["choices"][0]["message"]["content"])', "```", "",
                 "### Ollama", "", "```bash", f"ollama create {name} -f {Path(gguf_name).stem}.Modelfile",
                 f'ollama run {name} "..."', "```",
                 "", "The GGUF file's chat template and the Modelfile's template render the prompt exactly as the "
                 "studio did in training."],
    }
    order = [kind] + [k for k in KINDS if k != kind]
    return "\n\n".join("\n".join(blocks[k]) for k in order)


def ollama_name(run_id: str) -> str:
    import re

    return re.sub(r"[^a-z0-9._-]+", "-", run_id.lower()).strip("-") or "qlora-studio-model"


def render(run: Run, kind: str, f: dict | None = None, repo: str | None = None) -> str:
    from huggingface_hub import ModelCardData

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    f = f or facts(run)
    base = f["base_model"]
    data = ModelCardData(
        base_model=base if _is_hub_id(base) else None,
        library_name={"adapter": "peft", "merged": "transformers", "gguf": "gguf"}[kind],
        pipeline_tag="text-generation",
        tags=["qlora", "qlora-studio", "lora", "text-generation"] + (["gguf", "llama.cpp", "ollama"]
                                                                      if kind == "gguf" else []),
        datasets=[f["hub_dataset"]] if f["hub_dataset"] else None,
        model_name=run.id,
    )
    L: list[str] = [f"# {run.id}", "",
                    f"A {'LoRA adapter' if kind == 'adapter' else 'merged 16-bit model' if kind == 'merged' else 'GGUF export'}"
                    f" fine-tuned with QLoRA Studio (preset `{f['preset']}`).", ""]
    L += ["## Model", "", "| | |", "|---|---|",
          f"| base model | `{base}` |", f"| base revision | `{f['base_revision']}` |",
          f"| quantization while training | {f['quantization']} (QLoRA) |",
          f"| this folder | {kind} |", ""]
    L += ["## Data", "", "| | |", "|---|---|", f"| dataset | `{_fmt(f['dataset'])}` |"]
    for d in f["dataset_files"]:
        L.append(f"| {d['role']} file sha256 | `{d['sha256'] or 'unavailable'}` |")
    L += [f"| training examples | {_fmt(f['train_examples'])} |",
          f"| validation examples | {_fmt(f['validation_examples'])} |",
          f"| skipped examples | {_fmt(f['skipped_examples'])} |", ""]
    L += ["## Prompt template", "", f"`{f['template']}`:", "", "```", f["template_text"], "```", ""]
    L += ["## Hyperparameters", "", "| setting | value |", "|---|---|"]
    L += [f"| `{k}` | {_fmt(v)} |" for k, v in f["hyperparameters"].items()]
    L += [""]
    hw = f["gpu"] if f["device"] != "cpu" else "CPU"
    gpus = f" × {f['num_gpus']}" if f["num_gpus"] and f["num_gpus"] > 1 else ""
    L += ["## Training", "", "| | |", "|---|---|",
          f"| hardware | {_fmt(hw)}{gpus} |",
          f"| training time | {_duration(f['train_seconds'])} |",
          f"| optimizer steps | {_fmt(f['steps'])} |",
          f"| final training loss | {_fmt(f['final_train_loss'])} (step {_fmt(f['final_train_loss_step'])}) |",
          f"| final validation loss | {_fmt(f['final_validation_loss'])} (step "
          f"{_fmt(f['final_validation_loss_step'])}) |", "",
          "![loss curve](loss_curve.png)", ""]
    L += ["## Evaluation", ""]
    ev = f["evaluation"]
    if ev:
        L += [f"Base model vs tuned on {ev['n']} validation examples (the Evaluate tab):", "",
              "| metric | base | tuned |", "|---|---|---|"]
        for m in ev["tuned"]:
            L.append(f"| {m} | {_fmt(ev['base'].get(m))} | {_fmt(ev['tuned'][m])} |")
    else:
        L.append("No evaluation was run (Evaluate tab or `python -m studio evaluate`).")
    L += ["", "## GGUF check", ""]
    if f["gguf"]:
        L += ["Each GGUF file loaded in llama.cpp and compared with the merged model (transformers, float32) on the "
              "run's own prompts: tokenization, greedy answers, and the logits at every position of prompt + answer.",
              "", "| file | result | prompts | tokens identical | greedy answers equal | top-1 agreement | "
              "max abs logit diff | bar |", "|---|---|---|---|---|---|---|---|"]
        for c in f["gguf"]:
            bar = ", ".join(f"{k} {'≥' if k == 'top1_agreement' else '≤' if k.startswith('max') else '='} {v}"
                            for k, v in c["bar"].items())
            L.append(f"| {c['kind'].upper()} | {'passed' if c['passed'] else 'FAILED'} | {c['prompts']} | "
                     f"{'yes' if c['tokens_equal'] else 'no'} | {c['greedy_equal']}/{c['prompts']} | "
                     f"{c['top1_agreement']:.2%} | {c['max_abs_logit_diff']:.4f} | {bar} |")
    else:
        L.append("No GGUF file was exported yet.")
    L += ["", "## How to use", "", usage(run, kind, f, repo), ""]
    body = "\n".join(L)
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def write(run: Run, folder: str | Path, kind: str, repo: str | None = None) -> Path:
    from huggingface_hub import ModelCard

    folder = Path(folder)
    f = facts(run)
    card = ModelCard(render(run, kind, f, repo))
    loss_curve_png(f, folder / "loss_curve.png")
    path = folder / "README.md"
    card.save(str(path))
    return path
