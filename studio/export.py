"""Export a finished run: adapter zip, merged 16-bit model, Hub push, and the code that loads them.

Contract:
- ``adapter_zip(run)`` writes ``<run>/export/<run id>-adapter.zip`` holding the adapter and tokenizer.
- ``merge(run)`` loads the base model unquantized in 16-bit (bf16 where supported, else fp16; fp32
  on the CPU), merges the adapter and saves a standalone model (safetensors) plus tokenizer in
  ``<run>/merged``; the merged model gives the same logits as base+adapter unquantized.
- ``push(run, repo, token, private=True, merged=False)`` uploads the adapter (or merged model) with
  ``huggingface_hub``; the token is used for the call only and never written or logged.
- ``load_snippet(run, merged)`` returns the few lines of Python that load the result.
- ``merged_zip(run)`` zips ``<run>/merged`` for the browser's download.
- ``export_gguf(run, kind, progress)`` (kind ``f16``, ``q8_0`` or ``q4_k_m``) merges if needed, writes
  ``<run>/export/gguf/<run id>-<kind>.gguf`` (``studio.gguf_export``), ``<run id>-<kind>.Modelfile`` for Ollama beside it, checks
  the file in llama.cpp against the merged model on the run's own prompts (``<…>.check.json``, a ``gguf_check``
  event) and refreshes the folder's model card.  Returns a ``GGUFExport``.
- Every adapter, merged and GGUF folder carries a model card (``studio.model_card``); a push carries it too.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from studio.runs import Run
from studio.security import redact


class ExportError(RuntimeError):
    pass


def _require_adapter(run: Run) -> Path:
    if not (run.adapter_dir / "adapter_model.safetensors").exists():
        raise ExportError(f"run {run.id!r} has no final adapter yet; finish (or resume) the run first.")
    return run.adapter_dir


def adapter_zip(run: Run) -> Path:
    src = _require_adapter(run)
    write_card(run, src, "adapter")
    out = run.dir / "export" / f"{run.id}-adapter.zip"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".zip.partial")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, f"{run.id}-adapter/{p.relative_to(src)}")
    tmp.replace(out)
    return out


def merge(run: Run, token: str | None = None, adapter_path: str | Path | None = None) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from studio import modeling
    from studio.hardware import detect

    cfg = run.config()
    src = Path(adapter_path) if adapter_path else _require_adapter(run)
    hw = detect()
    dtype = torch.float32 if hw.device == "cpu" else (torch.bfloat16 if hw.bf16 else torch.float16)
    tok = modeling.load_tokenizer(cfg, token=token)
    from studio.security import safe_load_kwargs

    base = AutoModelForCausalLM.from_pretrained(modeling.resolve_base(cfg.model.base_model), dtype=dtype,
                                                token=token, device_map="cpu" if hw.device == "cpu" else "auto",
                                                **safe_load_kwargs(cfg.model.trust_remote_code))
    if len(tok) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tok))
    merged = PeftModel.from_pretrained(base, str(src)).merge_and_unload()
    out = run.dir / "merged"
    tmp = run.dir / "merged.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    write_card(run, tmp, "merged")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    run.emit("log", message="merged model saved to merged/")
    return out


def push(run: Run, repo: str, token: str | None, private: bool = True, merged: bool = False) -> str:
    from huggingface_hub import HfApi

    from studio.security import hub_token

    token = hub_token(token)
    if not token:
        raise ExportError("no Hub token: set HF_TOKEN or enter a token with write access.")
    if "/" not in repo:
        raise ExportError("output.hub_repo: use owner/name.")
    folder = (run.dir / "merged") if merged else _require_adapter(run)
    if not folder.exists():
        raise ExportError("no merged model yet; merge first.")
    write_card(run, folder, "merged" if merged else "adapter", repo=repo)
    try:
        api = HfApi(token=token)
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message=f"QLoRA Studio run {run.id}")
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"push to {repo} failed: {redact(str(e))[:300]}") from None
    return f"https://huggingface.co/{repo}"


def load_snippet(run: Run, merged: bool = False) -> str:
    cfg = run.config()
    base = cfg.model.base_model
    if merged:
        return (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{run.dir / 'merged'}\")\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{run.dir / 'merged'}\")\n")
    return (f"from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"adapter_dir = \"{run.adapter_dir}\"\n"
            f"tokenizer = AutoTokenizer.from_pretrained(adapter_dir)\n"
            f"base = AutoModelForCausalLM.from_pretrained(\"{base}\")\n"
            f"model = PeftModel.from_pretrained(base, adapter_dir)\n")


def write_card(run: Run, folder: Path, kind: str, repo: str | None = None) -> None:
    """Write (or refresh) the folder's model card; a card that cannot be written never blocks an export."""
    from studio import model_card

    try:
        model_card.write(run, folder, kind, repo=repo)
    except Exception as e:  # noqa: BLE001
        run.emit("log", message=f"model card not written in {folder.name}/: {type(e).__name__}: {str(e)[:200]}")


def merged_zip(run: Run) -> Path:
    src = run.dir / "merged"
    if not (src / "config.json").exists():
        raise ExportError("no merged model yet; merge first.")
    out = run.dir / "export" / f"{run.id}-merged.zip"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".zip.partial")
    # Stored, not deflated: safetensors barely compress and the zip is made for a download.
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, f"{run.id}-merged/{p.relative_to(src)}")
    tmp.replace(out)
    return out


@dataclass
class GGUFExport:
    path: Path
    modelfile: Path
    card: Path
    check: dict | None
    ollama_create: str

    def summary(self) -> str:
        from studio.gguf_export import GGUFCheck

        check = GGUFCheck(**{k: v for k, v in self.check.items() if k != "file"}).summary() if self.check else "not checked (no llama-cpp-python here)"
        return f"{self.path.name} ({self.path.stat().st_size / 2**20:.1f} MiB). Check: {check}"


def run_prompts(run: Run, tokenizer, n: int = 4) -> list[str]:
    """The run's own prompts: its validation examples (else training examples), rendered by its template."""
    from studio.data.pipeline import train_val_examples
    from studio.data.templates import TemplateSpec, render_prompt

    cfg = run.config()
    train, val = train_val_examples(cfg.data)
    spec = TemplateSpec.from_config(cfg.data)
    examples = (val or train)[: max(n, 1)]
    return [render_prompt(ex.instruction, spec, tokenizer, system=ex.system, input=ex.input) for ex in examples]


def templates(spec, tokenizer) -> tuple[str, str, list[str]]:
    """(chat template for the GGUF file, Ollama template, stop strings) that render the prompt exactly as the
    studio's ``render_prompt`` does for ``spec`` (a ``TemplateSpec``): a chat run keeps the model's own Jinja
    template; the studio's templates become a single-turn Jinja template."""
    from studio import gguf_export as gx
    from studio.data.templates import render_prompt, stop_strings

    shape = gx.prompt_shape(lambda text, system: render_prompt(text, spec, tokenizer, system=system))
    chat = tokenizer.chat_template if spec.name == "chat" and tokenizer.chat_template else gx.jinja_template(shape)
    stops = [s for s in [tokenizer.eos_token, *stop_strings(spec)] if s]
    return chat, gx.ollama_template(shape), stops


def export_gguf(run: Run, kind: str, progress: Callable[[float, str], None] | None = None, verify: bool = True,
                prompts: int = 4) -> GGUFExport:
    from transformers import AutoTokenizer

    from studio import gguf_export as gx
    from studio.model_card import ollama_name

    if kind not in gx.KINDS:
        raise ExportError(f"--gguf: choose one of {', '.join(gx.KINDS)}; got {kind!r}.")
    say = progress or (lambda frac, desc: None)
    _require_adapter(run)
    merged = run.dir / "merged"
    try:
        # Refuse an unsupported architecture before spending a merge on it.
        gx.check_config(json.loads((merged / "config.json").read_text()) if (merged / "config.json").exists()
                        else _base_config(run))
        if not (merged / "config.json").exists():
            say(0.0, "merging the adapter into a 16-bit model")
            merge(run)
        tok = AutoTokenizer.from_pretrained(str(merged))
        from studio.data.templates import TemplateSpec

        chat, go_template, stops = templates(TemplateSpec.from_config(run.config().data), tok)
        folder = run.dir / "export" / "gguf"
        out = folder / f"{run.id}-{kind}.gguf"
        name = run.id
        if kind == "q4_k_m":
            f16 = folder / f"{run.id}-f16.gguf"
            if not f16.exists():
                gx.write_gguf(merged, f16, "f16", chat_template=chat, name=name,
                              progress=lambda f, d: say(0.05 + 0.45 * f, f"F16: {d}"))
            say(0.5, "quantizing F16 to Q4_K_M with llama.cpp")
            gx.quantize(f16, out, "q4_k_m")
        else:
            gx.write_gguf(merged, out, kind, chat_template=chat, name=name,
                          progress=lambda f, d: say(0.05 + 0.6 * f, d))
        cfg = json.loads((merged / "config.json").read_text())
        num_ctx = int(min(cfg.get("max_position_embeddings", 4096), 4096))
        modelfile = out.with_suffix(".Modelfile")  # one per GGUF file: exporting another type keeps this one
        modelfile.write_text(gx.modelfile(out.name, go_template, stops, num_ctx, modelfile.name))
        check = None
        if verify and kind != "q4_k_m":
            try:
                gx.llama_cpp()
            except gx.GGUFError as e:
                # The file is written; saying plainly that it was not checked beats refusing it.
                verify = False
                run.emit("log", message=f"GGUF {kind} not checked: {e}")
        if verify:
            say(0.7, "checking the file in llama.cpp against the merged model")
            ps = run_prompts(run, tok, prompts)
            result = gx.check_gguf(merged, out, kind, ps, progress=lambda f, d: say(0.7 + 0.28 * f, d))
            check = result.to_dict() | {"file": out.name}
            (folder / f"{run.id}-{kind}.check.json").write_text(json.dumps(check, indent=1))
            run.emit("gguf_check", **{k: v for k, v in check.items() if k != "first_difference"},
                     first_difference=check["first_difference"][:300])
    except gx.GGUFError as e:
        raise ExportError(str(e)) from None
    from studio import model_card

    card = model_card.write(run, folder, "gguf")
    write_card(run, merged, "merged")  # the merged and adapter cards show the GGUF check too
    write_card(run, run.adapter_dir, "adapter")
    say(1.0, "done")
    run.emit("log", message=f"GGUF {kind} saved to export/gguf/{out.name}")
    return GGUFExport(out, modelfile, card, check, f"ollama create {ollama_name(run.id)} -f {modelfile}")


def _base_config(run: Run) -> dict:
    from transformers import AutoConfig

    from studio import modeling

    cfg = run.config()
    return AutoConfig.from_pretrained(modeling.resolve_base(cfg.model.base_model), revision=cfg.model.revision,
                                      trust_remote_code=False).to_dict()
