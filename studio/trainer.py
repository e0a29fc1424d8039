"""transformers' Trainer with the token count kept off the GPU's critical path.

``include_num_input_tokens_seen`` (the Train tab's tokens/s) makes Trainer count each micro-batch's tokens
with ``.item()`` right after queueing its backward: the host then waits for the GPU to finish that
backward and the GPU idles while the host prepares the next micro-batch (about 10 ms a micro-batch at 16k
tokens on an H100, 1% of a step; measured with ``bench.profile_step --gaps``).

Contract: ``studio_trainer_cls()`` returns a ``Trainer`` subclass that counts the same tokens (non-padding:
the attention mask's sum, else tokens other than the pad id, else all) on the device without waiting, and
adds them to ``state.num_input_tokens_seen`` (gathered over ranks, as Trainer does) before anything reads
it: every ``log`` (which the callbacks' ``on_log`` runs inside; Trainer logs at the end of training too)
and every checkpoint save.  Every rank runs those same calls, so the gather stays collective.
"""

from __future__ import annotations

import functools


@functools.cache
def studio_trainer_cls():
    import torch
    from transformers import Trainer

    class StudioTrainer(Trainer):
        _pending_tokens = None

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

        def _save_checkpoint(self, *args, **kwargs):
            self.flush_tokens()
            return super()._save_checkpoint(*args, **kwargs)

    return StudioTrainer
