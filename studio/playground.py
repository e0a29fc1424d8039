"""Holds one loaded base model with a run's adapters for the playground, evaluation and A/B votes.

Contract:
- ``ModelHolder.load(run, checkpoints)`` loads the run's base model once (re-used while the base
  and quantization stay the same) and loads the final adapter as ``final`` and each chosen
  checkpoint as ``ckpt-N``; base answers come from the same weights with the adapter disabled.
  A preference stage's final adapter is named by its method (``dpo``, ``orpo``, ``kto``) and the adapter it
  started from is loaded beside it as ``sft`` (``start`` when that was itself a stage), so SFT and
  preference answers are compared side by side and blind on one base.
- It refuses to load while a training worker is alive on a CUDA GPU unless free GPU memory covers
  the estimate (one model per GPU at a time), with a message saying so.
- ``stream(prompt, adapter, sampling)`` yields growing text under a lock, so concurrent requests
  never toggle adapters under each other.
- ``stream_chat(history, text, adapter, sampling)`` does the same for a whole conversation: ``render_chat``
  renders the earlier turns and the new text with the run's template or the model's chat template.
- ``record_vote`` appends prompt/chosen/rejected to ``<home>/preferences.jsonl`` (a DPO-ready file)
  and ``tally`` counts the votes.

The votes file, ``preferences.jsonl``: one JSON object a line, readable as is by TRL's ``DPOTrainer``:

    {"prompt": str,     # the full prompt the two answers continue, rendered exactly as the model read it:
                        # for a multi-turn chat every earlier turn (the conversation as chosen so far) and the
                        # new user message, in the run's template (or the model's chat template)
     "chosen": str,     # the preferred answer (the text only, no end marker)
     "rejected": str,   # the other answer
     "winner": "tuned" | "base",                      # which model wrote "chosen"
     "loser": ...,      # which model wrote "rejected" (votes written before this field lack it)
     "run": str, "adapter": str,                     # the run and the tuned adapter compared
     "turn": int,       # 1 for a single prompt, n for the n-th turn of a conversation (absent in old votes)
     "messages": [...]} # the conversation up to this turn as role/content messages (absent in old votes)

Ties are not written.  A training run on these votes reads ``prompt``, ``chosen`` and ``rejected`` only.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from studio.runs import Run, RunStore, studio_home
from studio.security import check_name, inside


class PlaygroundError(RuntimeError):
    pass


START_ADAPTERS = ("sft", "start")  # a preference stage's starting adapter, loaded beside the stage's own


def gpu_busy(store: RunStore, cfg=None) -> str | None:
    """Why a second model may not load now: a training worker holds the GPU and memory does not allow it.

    With ``cfg`` the model's inference estimate is compared against free GPU memory; without, any
    training run on a CUDA GPU counts as busy.  ``None`` when loading is fine (always on a CPU).
    """
    import torch

    active = store.active()
    if active is None or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    if cfg is not None:
        from studio.estimate import arch_for, estimate

        arch = arch_for(cfg)
        if arch is not None and estimate(cfg, arch, micro_batch=1, seq_len=512).total < free:
            return None
    return (f"run {active.id!r} is training on the GPU and {free / 2**30:.1f} GiB is free; try again when it "
            "finishes (or stop it).")


class ModelHolder:
    def __init__(self):
        self.lock = threading.Lock()
        self.model = None
        self.tokenizer = None
        self.base_key = None
        self.run: Run | None = None
        self.adapters: list[str] = []
        self.spec = None

    def load(self, run: Run, checkpoints: list[str] | None = None, store: RunStore | None = None) -> list[str]:
        from studio.data.templates import TemplateSpec
        from studio.modeling import load_for_inference

        cfg = run.config()
        store = store or RunStore()
        adapters: dict[str, Path] = {}
        if (run.adapter_dir / "adapter_model.safetensors").exists():
            # A preference stage's adapter is named by its method, so "dpo" and "sft" read as such side by side.
            adapters[cfg.prefer.method if cfg.prefer.parent_run else "final"] = run.adapter_dir
        for ck in checkpoints or []:
            p = inside(run.checkpoints_dir, check_name(str(ck), "checkpoint"))  # a name, never a path elsewhere
            if (p / "adapter_model.safetensors").exists():
                adapters[f"ckpt-{ck.split('-')[-1]}"] = p
        if not adapters:
            raise PlaygroundError(f"run {run.id!r} has no adapter or checkpoint yet.")
        adapters.update(stage_start(run, store))
        key = (cfg.model.base_model, cfg.model.quantization, cfg.model.double_quant, cfg.model.compute_dtype)
        with self.lock:
            busy = gpu_busy(store, cfg)
            if busy:
                raise PlaygroundError(busy)
            self.unload_locked()
            model, tok = load_for_inference(cfg, adapters)
            self.model, self.tokenizer, self.base_key, self.run = model, tok, key, run
            self.adapters = list(adapters)
            self.spec = TemplateSpec.from_config(cfg.data)
        return self.adapters

    def unload_locked(self) -> None:
        import gc

        import torch

        self.model = None
        self.tokenizer = None
        self.adapters = []
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def stream(self, prompt: str, adapter: str | None, sampling, input: str = ""):
        from studio.generate import stream

        if self.model is None:
            raise PlaygroundError("load a run first.")
        if adapter is not None and adapter not in self.adapters:
            raise PlaygroundError(f"adapter {adapter!r} is not loaded.")
        yield from stream(self.model, self.tokenizer, prompt, self.spec, adapter=adapter, sampling=sampling,
                          lock=self.lock, input=input)

    def render_chat(self, history: list[dict], text: str) -> str:
        from studio.generate import render_conversation

        if self.model is None:
            raise PlaygroundError("load a run first.")
        return render_conversation(history, text, self.spec, self.tokenizer)

    def stream_chat(self, history: list[dict], text: str, adapter: str | None, sampling):
        """Yield the growing answer to ``text`` after the conversation ``history`` (role/content messages)."""
        from studio.generate import stream

        prompt = self.render_chat(history, text)
        if adapter is not None and adapter not in self.adapters:
            raise PlaygroundError(f"adapter {adapter!r} is not loaded.")
        yield from stream(self.model, self.tokenizer, text, self.spec, adapter=adapter, sampling=sampling,
                          lock=self.lock, prompt=prompt)

    def answer(self, prompt: str, adapter: str | None, sampling, input: str = "") -> str:
        text = ""
        for text in self.stream(prompt, adapter, sampling, input=input):
            pass
        return text


def stage_start(run: Run, store: RunStore) -> dict[str, Path]:
    """For a preference stage, ``{"sft": the adapter it started from}`` (``"start"`` when that was itself a stage),
    loaded beside the stage's own so the two are compared on one base; empty for an SFT run or a parent gone."""
    from studio.votes import parent_adapter

    p = run.config().prefer
    if not p.parent_run:
        return {}
    try:
        parent = store.get(p.parent_run)
        path = parent_adapter(parent, p.parent_checkpoint)
    except (KeyError, ValueError):  # the parent run or its checkpoint was deleted: the stage alone
        return {}
    return {"start" if parent.config().prefer.parent_run else "sft": path}


def preferences_path() -> Path:
    return studio_home() / "preferences.jsonl"


def record_vote(prompt: str, chosen: str, rejected: str, meta: dict | None = None) -> dict:
    rec = {"prompt": prompt, "chosen": chosen, "rejected": rejected, **(meta or {})}
    p = preferences_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return rec


def tally() -> dict:
    counts = {"tuned": 0, "base": 0, "total": 0}
    p = preferences_path()
    if p.exists():
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            counts["total"] += 1
            w = rec.get("winner")
            if w in counts:
                counts[w] += 1
    return counts
