"""Export a finished run: adapter zip, merged 16-bit model, Hub push, and the code that loads them.

Contract:
- ``adapter_zip(run)`` writes ``<run>/export/<run id>-adapter.zip`` holding the adapter and tokenizer.
- ``merge(run)`` loads the base model unquantized in 16-bit (bf16 where supported, else fp16; fp32
  on the CPU), merges the adapter and saves a standalone model (safetensors) plus tokenizer in
  ``<run>/merged``; the merged model gives the same logits as base+adapter unquantized.
- ``push(run, repo, token, private=True, merged=False)`` uploads the adapter (or merged model) with
  ``huggingface_hub``; the token is used for the call only and never written or logged.
- ``load_snippet(run, merged)`` returns the few lines of Python that load the result.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

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
