"""transformers' Trainer with the host's waits kept off the GPU's critical path.

Two waits of the stock stack leave the GPU idle while the host prepares the next work (found with
``bench.profile_step --gaps`` on an H100 at 16k tokens a micro-batch):

- ``include_num_input_tokens_seen`` (the Train tab's tokens/s) makes Trainer count each micro-batch's
  tokens with ``.item()`` right after queueing its backward (about 10 ms a micro-batch).
- bitsandbytes' 8-bit optimizers call ``torch.cuda.synchronize()`` after every parameter's update (256
  times a step for LoRA on q,k,v,o of Mistral-7B).  Their kernels run on the legacy default stream, which
  is also where training runs, so the order of the updates and of everything after them holds without
  those waits (bitsandbytes keeps them for callers on other streams).

Contract: ``studio_trainer_cls()`` returns a ``Trainer`` subclass that
- counts the model's parameters once for Trainer's FLOP count (the same number; Trainer walks the model again
  for every micro-batch).
- counts the same tokens (non-padding: the attention mask's sum, else tokens other than the pad id, else
  all) on the device without waiting, and adds them to ``state.num_input_tokens_seen`` (gathered over
  ranks, as Trainer does) before anything reads it: every ``log`` (which the callbacks' ``on_log`` runs
  inside; Trainer logs at the end of training too) and every checkpoint save.  Every rank runs those same
  calls, so the gather stays collective.
- steps a bitsandbytes optimizer without its per-parameter synchronizations while the current stream is
  the default stream (``without_param_syncs``); the updates are the same, bit for bit.
- hands the optimizer it makes to ``prepare_optimizer`` where set (the run's speed plan: studio.speed), and
  steps the LR schedule as ``studio.speed.flat_optimizer.defer_scheduler`` says for a merged 8-bit optimizer.
"""

from __future__ import annotations

import functools
import types


def _no_sync(_tensor) -> None:
    return None


def without_param_syncs(optimizer) -> bool:
    """Make a bitsandbytes optimizer's ``step`` skip ``sync_gpu`` while on the default CUDA stream; True if
    ``optimizer`` is one (else it is left alone)."""
    try:
        import bitsandbytes.optim.optimizer as bnb_optim
    except ImportError:
        return False
    if not isinstance(optimizer, bnb_optim.Optimizer8bit) or getattr(optimizer, "_studio_no_syncs", False):
        return False
    step = optimizer.step

    def stepped(self, *args, **kwargs):
        import torch

        if not torch.cuda.is_available() or torch.cuda.current_stream() != torch.cuda.default_stream():
            return step(*args, **kwargs)
        sync, bnb_optim.sync_gpu = bnb_optim.sync_gpu, _no_sync
        try:
            return step(*args, **kwargs)
        finally:
            bnb_optim.sync_gpu = sync

    # A bound method, as torch's LR schedulers expect of the step they wrap.
    optimizer.step = types.MethodType(stepped, optimizer)
    optimizer._studio_no_syncs = True
    return True


@functools.cache
def studio_trainer_cls():
    import torch
    from transformers import Trainer

    class StudioTrainer(Trainer):
        _pending_tokens = None
        _param_count = None
        skip_eval_logits = False  # set when the model computes its loss with Liger's fused kernel
        prepare_optimizer = None  # called with the optimizer Trainer makes (studio.speed.prepare_optimizer)

        def create_optimizer(self, *args, **kwargs):
            optimizer = super().create_optimizer(*args, **kwargs)
            if self.prepare_optimizer is not None:
                self.prepare_optimizer(self.optimizer)
            without_param_syncs(self.optimizer)  # before the scheduler wraps step
            return optimizer

        def train(self, *args, **kwargs):
            from studio.speed.flat_optimizer import settle

            out = super().train(*args, **kwargs)
            if self.optimizer is not None:  # the last update's fate, so the schedule reads as Trainer left it
                settle(self.optimizer)
            return out

        def create_scheduler(self, num_training_steps, optimizer=None):
            from studio.speed.flat_optimizer import defer_scheduler

            scheduler = super().create_scheduler(num_training_steps, optimizer)
            # A merged 8-bit optimizer learns a step later whether GradScaler skipped an update; the schedule waits.
            self.lr_scheduler = defer_scheduler(self.optimizer, scheduler)
            return self.lr_scheduler

        def floating_point_ops(self, inputs):
            # Trainer's 6 x tokens x parameters for every micro-batch; counting the parameters walks every module
            # of the model (about a millisecond of host time a micro-batch for a 7B model), so it is counted once.
            name = getattr(self.model, "main_input_name", "input_ids")
            if name not in inputs or not hasattr(self.model, "num_parameters"):
                return 0
            if self._param_count is None:
                self._param_count = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[name].numel() * self._param_count

        def _track_num_input_tokens(self, inputs):
            mode = self.args.include_num_input_tokens_seen
            name = getattr(self.model, "main_input_name", "input_ids")
            if mode != "non_padding" or name not in inputs:
                return super()._track_num_input_tokens(inputs)
            pad = getattr(self.processing_class, "pad_token_id", None)
            if "attention_mask" in inputs:
                n = inputs["attention_mask"].sum()
            elif pad is not None:
                n = (inputs[name] != pad).sum()
            else:
                n = inputs[name].numel()
            n = torch.as_tensor(n, device=self.args.device, dtype=torch.int64)
            self._pending_tokens = n if self._pending_tokens is None else self._pending_tokens + n

        def flush_tokens(self) -> None:
            pending, self._pending_tokens = self._pending_tokens, None
            if pending is not None:
                self.state.num_input_tokens_seen += self.accelerator.gather(pending).sum().item()

        def log(self, logs, *args, **kwargs):
            self.flush_tokens()
            return super().log(logs, *args, **kwargs)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            # With Liger's fused loss (studio.speed.liger) an evaluation that only wants the loss never builds logits,
            # as Trainer does for its own use_liger_kernel.
            if prediction_loss_only and self.skip_eval_logits:
                inputs = {**inputs, "skip_logits": True}
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

        def _save_checkpoint(self, *args, **kwargs):
            self.flush_tokens()
            return super()._save_checkpoint(*args, **kwargs)

    return StudioTrainer
