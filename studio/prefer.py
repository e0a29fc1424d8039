"""The preference stage: DPO, ORPO or KTO (TRL's trainers) on top of a finished run's adapter.

Contract:
- A run whose config sets ``prefer.parent_run`` is a preference stage; the worker runs ``PreferRecipe`` for it
  (``studio.training.recipe_for``).  It is the SFT ``Recipe`` with a different ``setup`` and trainer: the same
  run folder, events, STOP, NaN halt, checkpoints, samples, terminal statuses and adapter saving
  (``studio.adapters``: the adapter loads with plain transformers + peft).
- The 4-bit base loads once.  The stage trains the parent's adapter (final, or ``prefer.parent_checkpoint``),
  loaded as peft's ``default`` adapter; for DPO and KTO, TRL keeps a frozen copy of it as the ``ref`` adapter
  and computes the reference log-probs with that adapter switched on, so the reference is exactly the SFT
  adapter the stage started from.  ORPO needs no reference.  Base weights are never trained.  With
  ``prefer.sft_weight`` > 0, DPO adds RPO's likelihood loss on the chosen answers (TRL's ``loss_type``
  ``["sigmoid", "sft"]``), which keeps them likely (and ending with EOS) while the margin grows.
- Pairs come from ``studio.votes`` (checked there: every refusal names the file, line and field) and are kept
  in the run folder as ``pairs.jsonl``; a resumed stage trains on the same pairs.
- Events beyond the SFT recipe's: ``metric`` carries ``reward_margin``, ``reward_accuracy``, ``reward_chosen``,
  ``reward_rejected``, ``logps_chosen`` and ``logps_rejected`` (KTO adds ``kl``, ORPO ``nll_loss`` and
  ``log_odds_ratio``) as TRL logs them; ``eval`` carries the same on the held-out pairs (``prefer.val_pairs``).
- ``answer_logp`` / ``margins`` measure a model's log-probability of answers under the run's template (what
  the stage moves: chosen minus rejected), for tests, evaluation and the UI.
This module never imports gradio.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

from studio.config import ConfigError
from studio.training import Recipe, _events_callback_cls

# TRL's log keys -> the fields of the studio's metric/eval events.
LOG_FIELDS = {"rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
              "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
              "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected", "kl": "kl",
              "nll_loss": "nll_loss", "log_odds_ratio": "log_odds_ratio"}


def trainer_classes(method: str):
    """(config class, trainer class) of TRL for ``method``."""
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # ORPO lives in TRL's experimental package

        return ORPOConfig, ORPOTrainer
    raise ConfigError("prefer.method", f"{method!r} is not one of dpo, orpo, kto.")


def split_pairs(pairs: list, n_val: int, seed: int) -> tuple[list, list]:
    """(train, held out): ``n_val`` pairs drawn with ``seed``; the order of both parts is kept."""
    if not n_val:
        return list(pairs), []
    held = set(random.Random(seed).sample(range(len(pairs)), n_val))
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def render_rows(pairs: list, method: str, spec, tokenizer) -> list[dict]:
    """TRL's text rows: the prompt rendered by the run's template, answers as the template ends them.

    DPO/ORPO: ``prompt/chosen/rejected``; KTO: ``prompt/completion/label`` (a pair gives a good and a bad row).
    TRL appends EOS to each answer, as the SFT stage's tokenizer step did.
    """
    from studio.data.schema import Example
    from studio.data.templates import render
    from studio.votes import Pair

    def answer(p, text):
        return render(Example(instruction=p.prompt, input=p.input, system=p.system, response=text), spec, tokenizer)

    rows = []
    for p in pairs:
        if isinstance(p, Pair):
            prompt, chosen = answer(p, p.chosen)
            _, rejected = answer(p, p.rejected)
            prompt = p.rendered or prompt  # a later turn of a Playground conversation: earlier turns included
            if method == "kto":
                rows += [{"prompt": prompt, "completion": chosen, "label": True},
                         {"prompt": prompt, "completion": rejected, "label": False}]
            else:
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        else:
            prompt, completion = answer(p, p.completion)
            rows.append({"prompt": prompt, "completion": completion, "label": p.label})
    return rows


class PreferRecipe(Recipe):
    """``Recipe`` with the preference stage's setup and TRL trainer; train, save, execute and cleanup are the
    SFT recipe's own."""

    def setup(self):
        from datasets import Dataset
        from peft import PeftModel
        from transformers import set_seed

        from studio import modeling, speed, votes
        from studio.data.schema import Example
        from studio.data.templates import TemplateSpec
        from studio.hardware import detect
        from studio.runs import RunStore

        cfg, p = self.cfg, self.cfg.prefer
        self.hw = modeling.preflight(cfg, detect(), self.token)
        try:
            parent = RunStore(self.run.dir.parent).get(p.parent_run)
        except KeyError:
            raise ConfigError("prefer.parent_run", f"no run named {p.parent_run!r} beside this one.") from None
        start = votes.parent_adapter(parent, p.parent_checkpoint)
        self.run.emit("status", status="starting", device=self.hw.device, gpu=self.hw.name, method=p.method,
                      parent_run=parent.id, adapter=str(start.relative_to(parent.dir)))
        self.plan = speed.plan(cfg, self.hw)  # the plain path: TRL's trainer runs none of the speed parts
        self.run.emit("plan", **self.plan.to_event())
        self.tokenizer = modeling.load_tokenizer(cfg, token=self.token)
        self.spec = TemplateSpec.from_config(cfg.data)
        snapshot = self.run.dir / votes.PAIRS_FILE
        if not snapshot.exists():
            pairs = votes.load_pairs(cfg, parent, self.token, self.tokenizer)
            votes.write_pairs(pairs, snapshot)
            source, left_out = pairs.source, pairs.left_out
        else:
            source, left_out = snapshot.name, 0
        pairs = votes.read_pairs(snapshot).pairs
        train_p, val_p = split_pairs(pairs, p.val_pairs, cfg.train.seed)
        train_rows = render_rows(train_p, p.method, self.spec, self.tokenizer)
        val_rows = render_rows(val_p, p.method, self.spec, self.tokenizer)
        self.prepared = SimpleNamespace(train=Dataset.from_list(train_rows),
                                        validation=Dataset.from_list(val_rows) if val_rows else None)
        self.sample_examples = [Example(instruction=x.prompt, input=x.input, system=x.system,
                                        response=getattr(x, "chosen", None) or x.completion)
                                for x in (val_p or train_p)[: cfg.train.sample_prompts]]
        kind = "answers" if train_p and isinstance(train_p[0], votes.Single) else "pairs"
        self.run.emit("data", train=len(train_rows), validation=len(val_rows), schema=f"preference ({p.method})",
                      source=source, left_out=left_out, skipped=0,
                      stats={"summary": f"{len(train_p)} {kind} from {source}"
                                        + (f"; {len(val_p)} held out" if val_p else "")})
        base = modeling.load_base(cfg, self.tokenizer, self.hw, self.token, dtype=self.dtype)
        set_seed(cfg.train.seed)
        model = modeling.prepare_for_lora(cfg, base, self.plan)
        try:
            self.model = PeftModel.from_pretrained(model, str(start), is_trainable=True)
        except Exception as e:  # noqa: BLE001 - a parent adapter that does not fit this base
            raise modeling.ModelError(f"prefer.parent_run: the adapter {start} could not be loaded onto "
                                      f"{cfg.model.base_model} ({str(e)[:200]}).") from None
        self.trainer = self._trainer()

    def _trainer(self):
        import torch

        cfg, p = self.cfg, self.cfg.prefer
        config_cls, trainer_cls = trainer_classes(p.method)
        self.callback = _events_callback_cls()(self)
        kw = self.training_arguments()
        kw.pop("remove_unused_columns")  # TRL keeps the token columns its collator needs
        has_val = self.prepared.validation is not None
        kw.update(num_train_epochs=p.epochs, max_steps=p.max_steps or -1, per_device_train_batch_size=p.batch_size,
                  per_device_eval_batch_size=p.batch_size, gradient_accumulation_steps=p.grad_accum,
                  learning_rate=p.learning_rate, warmup_steps=p.warmup_ratio,
                  eval_strategy=("steps" if p.eval_steps else "no") if has_val else "no",
                  eval_steps=p.eval_steps or None, save_strategy="steps" if p.save_steps else "no",
                  save_steps=p.save_steps or 500, beta=p.beta, max_length=p.max_length)
        if p.method == "orpo":  # its batches hold chosen_/rejected_input_ids, not the input_ids Trainer counts
            kw.update(include_num_input_tokens_seen="no")
        if p.method == "dpo" and p.sft_weight > 0:
            kw.update(loss_type=["sigmoid", "sft"], loss_weights=[1.0, p.sft_weight])
        if p.method == "kto":
            kw.update(desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight)
        trainer = trainer_cls(model=self.model, args=config_cls(**kw), train_dataset=self.prepared.train,
                              eval_dataset=self.prepared.validation, processing_class=self.tokenizer,
                              callbacks=[self.callback])
        # TRL casts a quantized model's trainable LoRA weights to bf16; the SFT stage trained them in fp32 (peft's
        # default), and bf16 would round away the small updates of a preference stage's learning rate.
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        return trainer

    def log_fields(self, logs: dict, prefix: str = "") -> dict:
        out = {f: float(logs[prefix + k]) for k, f in LOG_FIELDS.items() if logs.get(prefix + k) is not None}
        if prefix:
            out["perplexity"] = None  # exp of a preference loss means nothing
        return out


# ---- measuring what the stage moves ---------------------------------------------------------------------------

def answer_logp(model, tokenizer, spec, prompt: str, answer: str, *, input: str = "", system: str = "") -> float:
    """Sum of the log-probabilities ``model`` gives ``answer`` (and its EOS) after ``prompt`` in the template."""
    import torch

    from studio.data.schema import Example
    from studio.data.templates import render
    from studio.data.tokenize import IGNORE, tokenize_pair

    p, r = render(Example(instruction=prompt, input=input, system=system, response=answer), spec, tokenizer)
    tok = tokenize_pair(p, r, tokenizer, max_length=10**6)
    device = next(model.parameters()).device
    ids = torch.tensor([tok.input_ids], device=device)
    labels = torch.tensor([tok.labels], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    target = labels[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return float((logp * (target != IGNORE)).sum())


def margins(model, tokenizer, spec, pairs: list) -> list[float]:
    """log p(chosen) - log p(rejected) under ``model`` for each ``studio.votes.Pair``."""
    was = model.training
    model.eval()
    try:
        return [answer_logp(model, tokenizer, spec, p.prompt, p.chosen, input=p.input, system=p.system)
                - answer_logp(model, tokenizer, spec, p.prompt, p.rejected, input=p.input, system=p.system)
                for p in pairs]
    finally:
        if was:
            model.train()
