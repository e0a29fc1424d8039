"""The training recipe: one run directory in, an adapter (or a clear failure) out.

Steps, in order, each a method of ``Recipe``: ``setup`` (preflight, tokenizer, data, model, LoRA,
trainer), ``train`` (fresh or resumed from the last complete checkpoint), ``save`` (adapter and
tokenizer to ``adapter/``, copy, optional merge and Hub push) and ``cleanup``.  ``execute`` runs them
and always leaves a terminal status event: ``completed``, ``stopped`` (cooperative stop; the
checkpoint of the last finished step is kept), ``halted`` (NaN/inf loss; nothing is overwritten),
or ``failed`` (with the step, the reason and a remedy).

Events written (see ``studio.runs``): ``status``, ``data`` (counts and length stats), ``metric``
(step, epoch, loss, learning_rate, grad_norm, tokens_per_s, memory), ``eval`` (eval_loss,
perplexity), ``sample`` (answers to fixed validation prompts at each evaluation), ``checkpoint``,
``plan`` (how this run computes on this machine, each part with its reason: ``studio.speed``), and from the
parts the plan switches on ``weight_cache``, ``fused_lora``, ``liger``, ``checkpoint_offload`` and ``graphs``.
Speed lives in ``studio.speed``: the recipe plans, prepares the model, picks the collator and adds the
callback, and reads as data, model, LoRA, train, save.
This module never imports gradio; it runs inside the worker process or a test.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time

from studio import adapters, speed
from studio.config import ConfigError, RunConfig
from studio.runs import Run


class Halted(RuntimeError):
    pass


def _events_callback_cls():
    from transformers import TrainerCallback

    class EventsCallback(TrainerCallback):
        """Writes the run's events from inside the Trainer loop and honours the STOP flag."""

        def __init__(self, recipe: "Recipe"):
            self.r = recipe
            self.run = recipe.run
            self.stopped = False
            self.halted_at: int | None = None
            self._t = time.time()
            self._tokens = 0

        def on_train_begin(self, args, state, control, **kw):
            import torch

            if torch.cuda.is_available():
                # Loading quantizes 16-bit shards on the GPU: their blocks stay cached (reserved) unless released.
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()  # the run's peak, not whatever came before it
            self._t = time.time()
            self._tokens = state.num_input_tokens_seen or 0
            self.t0 = self._t
            if self.r.resumed_from is not None and self.r.trainer.is_fsdp_enabled:
                n = adapters.restore_lora(self.r.trainer, self.r.resumed_from)
                self.run.emit("log", message=f"restored {n} LoRA tensors from {self.r.resumed_from.name}")
            self.run.emit("status", status="running", step=state.global_step, max_steps=state.max_steps,
                          epochs=args.num_train_epochs)

        def on_step_begin(self, args, state, control, model=None, **kw):
            from studio import faults

            faults.before_step(state.global_step + 1, model)

        def on_step_end(self, args, state, control, **kw):
            if _any_rank(self.run.stop_flag.exists()) and not self.stopped:
                self.stopped = True
                control.should_training_stop = True
                control.should_save = True  # keep the step just finished as a complete checkpoint
                self.run.emit("status", status="stopping", step=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            from studio.hardware import memory_snapshot

            logs = logs or {}
            if "loss" in logs:
                now = time.time()
                seen = state.num_input_tokens_seen or 0
                tps = (seen - self._tokens) / max(now - self._t, 1e-9)
                self._t, self._tokens = now, seen
                loss = float(logs["loss"])
                self.run.emit("metric", step=state.global_step, max_steps=state.max_steps,
                              epoch=round(state.epoch or 0.0, 4), loss=loss, learning_rate=logs.get("learning_rate"),
                              grad_norm=logs.get("grad_norm"), tokens_per_s=round(tps, 1), tokens_seen=seen,
                              elapsed=round(now - self.t0, 2), memory=memory_snapshot(), **self.r.log_fields(logs))
                if not math.isfinite(loss) or not math.isfinite(float(logs.get("grad_norm") or 0.0)):
                    self.halted_at = state.global_step
                    control.should_training_stop = True
                    control.should_save = False  # never overwrite the last good checkpoint with NaN weights
                    control.should_evaluate = False
            if "eval_loss" in logs:
                el = float(logs["eval_loss"])
                self.run.emit("eval", **{"step": state.global_step, "eval_loss": el,
                                         "perplexity": math.exp(el) if el < 50 else float("inf"),
                                         **self.r.log_fields(logs, "eval_")})

        def on_evaluate(self, args, state, control, model=None, **kw):
            # Generation under FSDP would need every rank's shards gathered: samples are skipped there.
            if model is not None and self.halted_at is None and not self.r.cfg.train.fsdp:
                self.r.emit_samples(model, state.global_step)
            self._t = time.time()  # tokens/s measures training, not evaluation

        def on_save(self, args, state, control, **kw):
            self.r.finish_checkpoint(state.global_step)
            self._t = time.time()

            self.run.emit("checkpoint", step=state.global_step,
                          path=f"checkpoints/checkpoint-{state.global_step}")

    return EventsCallback


def _any_rank(flag: bool) -> bool:
    """True on every process when it is true on any: all GPUs must stop at the same step or DDP hangs."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    import torch

    t = torch.tensor([1.0 if flag else 0.0], device=f"cuda:{torch.cuda.current_device()}")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def recipe_for(run: Run) -> type["Recipe"]:
    """The recipe a run's config asks for: SFT, or the preference stage when ``prefer.parent_run`` is set."""
    if run.config().prefer.parent_run:
        from studio.prefer import PreferRecipe

        return PreferRecipe
    return Recipe


OOM_REMEDY = ("set speed.micro_batch lower (the effective batch stays), lower "
              "data.max_length, or set speed.gradient_checkpointing to on.")


class Recipe:
    def __init__(self, run: Run, token: str | None = None):
        self.run = run
        self.cfg: RunConfig = run.config()
        self.token = token
        self.trainer = None
        self.callback = None
        self.sample_examples = []
        self.graphed_samples = False  # the plan's graph_decode, until it fails once
        self.resumed_from = None  # the checkpoint folder train() resumes from, if any

    # ---- steps --------------------------------------------------------------------------------
    def setup(self):
        from studio import modeling
        from studio.data.pipeline import prepare
        from studio.data.templates import TemplateSpec
        from studio.hardware import detect

        from transformers import set_seed

        cfg = self.cfg
        if cfg.output.adapter_dir:
            from studio.security import check_output_free, output_dir

            check_output_free(output_dir(cfg.output.adapter_dir))  # refuse now, not after the whole run
        self.hw = modeling.preflight(cfg, detect(), self.token)
        self.run.emit("status", status="starting", device=self.hw.device, gpu=self.hw.name)
        self.plan = speed.plan(cfg, self.hw)
        self.run.emit("plan", **self.plan.to_event())
        self.graphed_samples = self.plan.graph_decode
        for note in self.plan.notes:
            self.run.emit("log", message=note)
        self.tokenizer = modeling.load_tokenizer(cfg, token=self.token)
        prepared = prepare(cfg, self.tokenizer, self.token)
        self.prepared = prepared
        self.spec = TemplateSpec.from_config(cfg.data)
        self.sample_examples = (prepared.val_examples or prepared.train_examples)[: cfg.train.sample_prompts]
        self.run.emit("data", train=len(prepared.train), validation=len(prepared.validation or []),
                      schema=prepared.detection.kind, skipped=len(prepared.skipped),
                      skipped_first=prepared.skipped[:5], dropped=prepared.dropped_fully_truncated,
                      stats=prepared.stats.to_dict())
        base = modeling.load_base(cfg, self.tokenizer, self.hw, self.token, dtype=self.dtype)
        # LoRA's initial weights come from the global RNG: seed it here so a run never depends on what
        # the process did before (another run, building the tiny model, loading data).
        set_seed(cfg.train.seed)
        self.model = modeling.add_lora(cfg, base, self.plan)
        speed.prepare_model(self.model, self.plan, self.run.emit, fsdp=cfg.train.fsdp)
        self.trainer = self._trainer()

    @property
    def dtype(self):
        """The compute dtype this run's plan runs (after any fallback)."""
        return self.plan.dtype

    def _args(self):
        from transformers import TrainingArguments

        return TrainingArguments(**self.training_arguments())

    def training_arguments(self) -> dict:
        """The Trainer's arguments as keywords (the preference stage passes them to TRL's configs)."""
        import torch

        from studio import modeling

        cfg, t = self.cfg, self.cfg.train
        dtype = self.dtype
        has_val = self.prepared.validation is not None and len(self.prepared.validation) > 0
        return dict(
            output_dir=str(self.run.checkpoints_dir),
            num_train_epochs=t.epochs,
            max_steps=t.max_steps or -1,
            per_device_train_batch_size=self.plan.micro_batch,
            per_device_eval_batch_size=self.plan.eval_batch or self.plan.micro_batch,
            gradient_accumulation_steps=self.plan.grad_accum,
            learning_rate=t.learning_rate,
            lr_scheduler_type=t.scheduler,
            warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
            optim=t.optimizer,
            weight_decay=t.weight_decay,
            max_grad_norm=max(t.max_grad_norm, 0.0),  # 0: no clipping (Trainer 5 compares it with 0: never None)
            seed=t.seed,
            data_seed=t.seed,
            logging_steps=t.logging_steps,
            logging_nan_inf_filter=False,  # a NaN must reach the callback, not be hidden
            eval_strategy=("steps" if t.eval_steps else "no") if has_val else "no",
            eval_steps=t.eval_steps or None,
            save_strategy="steps" if t.save_steps else "no",
            save_steps=t.save_steps or 500,
            save_total_limit=t.save_total_limit,
            report_to=["tensorboard"] if t.tensorboard else "none",
            bf16=self.hw.device == "cuda" and dtype == torch.bfloat16,
            fp16=self.hw.device == "cuda" and dtype == torch.float16,
            use_cpu=self.hw.device == "cpu",
            gradient_checkpointing=self.plan.gradient_checkpointing,
            gradient_checkpointing_kwargs=dict(modeling.GC_KWARGS),
            include_num_input_tokens_seen="non_padding",
            ddp_find_unused_parameters=False if t.num_gpus > 1 else None,
            use_liger_kernel=False,  # Liger goes on this model instance only (studio.speed.liger)
            # On a GPU, worker processes read and collate the next micro-batches while the GPU trains: in the main
            # process the GPU would wait for them at every optimizer step (the host syncs there).
            dataloader_num_workers=2 if self.hw.device == "cuda" else 0,
            dataloader_persistent_workers=self.hw.device == "cuda",
            # Batches arrive pinned; a blocking copy to the GPU waits for every queued kernel, and the GPU then waits
            # for the host's next launches (6 ms of an 80 ms step at 8 x 128 tokens: bench.profile_step --gaps).
            accelerator_config={"non_blocking": self.hw.device == "cuda"},
            disable_tqdm=True,
            remove_unused_columns=False,  # our datasets hold exactly input_ids and labels
        )

    def _trainer(self):
        # transformers' Trainer and collators: we tokenize and mask ourselves (the UI shows those masks),
        # so TRL's SFTTrainer would only add its Triton-only fused LM head, which has no CPU path.
        from studio.trainer import studio_trainer_cls

        self.callback = _events_callback_cls()(self)
        cfg = self.cfg
        trainer = studio_trainer_cls()(
            model=self.model, args=self._args(), train_dataset=self.prepared.train,
            eval_dataset=self.prepared.validation, data_collator=speed.collator(self.plan, self.tokenizer,
                                                                                cfg.data.max_length),
            processing_class=self.tokenizer,
            callbacks=[self.callback, speed.callback(self.plan, cfg.data.max_length, self.run.emit,
                                                     max(1, cfg.train.num_gpus))])
        trainer.skip_eval_logits = self.plan.fused_loss
        trainer.prepare_optimizer = lambda optimizer: speed.prepare_optimizer(optimizer, self.plan, self.run.emit)
        if trainer.is_fsdp_enabled:
            from peft.utils.other import fsdp_auto_wrap_policy

            trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
        return trainer

    def train(self, resume: bool = False):
        ckpt = self.run.last_checkpoint() if resume else None
        self.resumed_from = ckpt
        if ckpt is not None:
            self.run.emit("status", status="resuming", checkpoint=str(ckpt.relative_to(self.run.dir)))
        self.trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        if self.callback.halted_at is not None:
            raise Halted(f"the loss became NaN or infinite at step {self.callback.halted_at}")
        if not self.callback.stopped and self.prepared.validation is not None and len(self.prepared.validation):
            last = [e for e in self.run.all_events() if e.get("type") == "eval"]
            if not last or last[-1].get("step") != self.trainer.state.global_step:
                self.trainer.evaluate()

    def save(self):
        cfg = self.cfg
        out = self.run.adapter_dir
        tmp = out.with_name("adapter.partial")
        if not adapters.save_adapter(self.trainer, tmp, self.tokenizer):
            return  # every rank took part in gathering; rank 0 holds the full adapter and wrote it
        from studio.export import write_card

        write_card(self.run, tmp, "adapter")  # README.md (Hub metadata, how it was made) + loss_curve.png
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # the adapter folder appears whole or not at all
        if cfg.output.adapter_dir:
            from studio.security import SecurityError, output_dir, replace_output

            # Only inside the studio's outputs or an allowed folder, and never over a folder the studio did not make.
            try:
                dest = replace_output(out, output_dir(cfg.output.adapter_dir), note={"run": self.run.id})
            except SecurityError as e:
                raise SecurityError(f"{e} The adapter itself is saved in the run folder ({out}).") from None
            self.run.emit("log", message=f"adapter copied to {dest}")
        self.run.emit("log", message=f"adapter saved to {out.relative_to(self.run.dir)}")
        if cfg.output.merge or cfg.output.push_to_hub:
            from studio import export

            merged = export.merge(self.run, token=self.token) if cfg.output.merge else None
            if cfg.output.push_to_hub:
                url = export.push(self.run, cfg.output.hub_repo, token=self.token, private=cfg.output.hub_private,
                                  merged=merged is not None)
                self.run.emit("log", message=f"pushed to {url}")

    def finish_checkpoint(self, step: int) -> None:
        """Make the checkpoint Trainer just wrote hold the full, checked adapter (every rank calls this).

        Under FSDP Trainer's checkpoint keeps sharded state for resuming but no loadable adapter: the gathered
        one is written beside it, on every launch alike, so every checkpoint can be compared, exported or resumed.
        """
        adapters.save_adapter(self.trainer, self.run.checkpoints_dir / f"checkpoint-{step}", checkpoint=True)

    def cleanup(self):
        import gc

        import torch

        self.trainer = None
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- helpers ------------------------------------------------------------------------------
    def log_fields(self, logs: dict, prefix: str = "") -> dict:
        """Extra fields for the ``metric`` (or, with ``prefix="eval_"``, ``eval``) event of one Trainer log."""
        return {}

    def emit_samples(self, model, step: int):
        if not self.sample_examples:
            return
        import torch

        was_training = model.training
        model.eval()
        try:
            # Samples watch the run: the random state LoRA dropout draws from afterwards is left as it was.
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
                answers = self._answers(model)
            for ex, answer in zip(self.sample_examples, answers):
                self.run.emit("sample", step=step, prompt=ex.instruction, input=ex.input,
                              reference=ex.response, answer=answer)
        finally:
            if was_training:
                model.train()

    def _answers(self, model) -> list[str]:
        """The sample answers.  Samples watch a run and never end it: graphed decoding that fails (a model whose
        forward cannot be captured) is turned off for the rest of the run, with a note, and generate answers."""
        from studio.generate import generate_texts

        args = (model, self.tokenizer, self.sample_examples, self.spec, self.cfg.train.sample_max_new_tokens)
        if self.graphed_samples:
            try:
                return generate_texts(*args, graphed=True)
            except Exception as e:  # noqa: BLE001
                self.graphed_samples = False
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                self.run.emit("log", message=f"Graphed sample answers failed ({first}); this run's samples decode "
                              "eagerly from now on (speed.graph_decode off skips the attempt).")
        return generate_texts(*args)

    def execute(self, resume: bool = False) -> str:
        """Run every step; return the terminal status.  Never raises for training failures: each ends with
        ``Run.finish`` (a final status, a reason and a remedy that survive a full disk) and a line in the log."""
        import torch

        from studio.data.files import DataError
        from studio.failures import describe
        from studio.modeling import ModelError
        from studio.security import SecurityError

        step = lambda: self.trainer.state.global_step if self.trainer else 0  # noqa: E731
        try:
            self.setup()
            self.train(resume)
            if self.callback.stopped:
                ck = self.run.last_checkpoint()
                self.run.finish("stopped", step=step(), checkpoint=str(ck.relative_to(self.run.dir)) if ck else None)
                return "stopped"
            self.save()
            summary = {k: v for k, v in self.run.summary().items() if k in ("train_loss", "eval_loss", "step")}
            self.run.finish("completed", step=step(), final=summary)
            return "completed"
        except Halted as e:
            self._failed("halted", step=step(), reason="nan_loss", message=str(e),
                         remedy="lower train.learning_rate, keep max_grad_norm at 1.0, or use bf16 instead of fp16; "
                                "the last good checkpoint is kept.")
            return "halted"
        except torch.OutOfMemoryError as e:
            self._failed("failed", step=step(), reason="out_of_memory",
                         message=f"out of memory at step {step()}: {str(e).splitlines()[0][:200]}", remedy=OOM_REMEDY)
            return "failed"
        except (ConfigError, DataError, ModelError, SecurityError) as e:
            self._failed("failed", step=step(), reason="input", message=str(e),
                         remedy="fix the named field or file and start again.")
            return "failed"
        except adapters.AdapterError as e:
            self._failed("failed", step=step(), reason="adapter_incomplete", message=str(e),
                         remedy="resume the run from its last checkpoint, or start it on one GPU; the adapter "
                                "folder was not replaced.")
            return "failed"
        except Exception as e:  # noqa: BLE001 - the worker must always leave a terminal status
            info = describe(e, step(), self.run.dir)
            self._failed("failed", step=step(), **info)
            if info["reason"] not in ("disk_full",):
                import traceback

                with contextlib.suppress(OSError):
                    traceback.print_exc()
            return "failed"
        finally:
            self.cleanup()

    def _failed(self, status: str, **fields) -> None:
        """The terminal status first (it survives a full disk), then the same words in the worker log."""
        self.run.finish(status, **fields)
        with contextlib.suppress(OSError):
            print(f"[{status}] {fields.get('message', '')}" + (f" — {fields['remedy']}" if fields.get("remedy") else ""),
                  file=sys.stderr, flush=True)
