"""How a run computes, in one place: the planner and the machinery it switches on.

The recipe makes five calls, each doing nothing for a part its plan leaves off:

    plan = speed.plan(cfg, hw)                                  # what runs here, and why: studio.speed.planner
    speed.prepare_model(model, plan, emit, fsdp=...)            # after LoRA: weight cache, fused LoRA, Liger
    collator = speed.collator(plan, tokenizer, max_length)      # graphs' fixed rows, packed rows, or padding
    speed.prepare_optimizer(optimizer, plan, emit)              # as Trainer makes it: one 8-bit update
    callback = speed.callback(plan, recipe_dtype, emit, ...)    # at train begin: offloaded checkpoints, graphs

What is learned never depends on the plan (examples, epochs, learning rate and schedule, optimizer, effective
batch, LoRA rank, targets, dropout); the GPU tests compare every path with the plain one.  Modules: ``plan``
(the Plan), ``planner`` (the rules), ``profiles`` (common GPUs), ``graphs``, ``fused_lora``, ``offload``,
``weight_cache``, ``liger``, ``flat_optimizer``, ``graph_decode`` (the sample answers: ``studio.generate``).
Nothing here imports runs or ui.  ``emit(type, **fields)`` writes a run event.
"""

from __future__ import annotations

from studio.speed.plan import Plan, reference  # noqa: F401  (the package's vocabulary)


def plan(cfg, hw, **kw) -> Plan:
    """The plan for ``cfg`` on ``hw``; see ``studio.speed.planner.plan_run``."""
    from studio.speed.planner import plan_run

    return plan_run(cfg, hw, **kw)


def prepare_model(model, plan: Plan, emit, fsdp: bool = False) -> None:
    """Apply the model-side parts of ``plan`` to ``model`` (after LoRA is added), in the order they compose: the
    16-bit weight cache, then fused LoRA layers reading it (or one shared dequantization buffer), then Liger."""
    if plan.weight_cache:
        from studio.speed.weight_cache import cache_dequantized

        emit("weight_cache", gib=round(cache_dequantized(model, plan.dtype) / 2**30, 2))
    if plan.fused_lora:
        from studio.speed.fused_lora import fuse_lora, share_dequant_buffer

        layers = fuse_lora(model)
        shared = 0 if fsdp else share_dequant_buffer(model, plan.dtype)
        emit("fused_lora", layers=layers, shared_buffer_mib=round(shared / 2**20, 1))
    if plan.liger:
        from studio.speed.liger import apply_liger

        emit("liger", kernels=apply_liger(model, fused_loss=plan.fused_loss))


def prepare_optimizer(optimizer, plan: Plan, emit) -> None:
    """With ``flat_optimizer``, one 8-bit update for all LoRA tensors (before graphs record their addresses)."""
    if not plan.flat_optimizer:
        return
    from studio.speed.flat_optimizer import flatten

    n = flatten(optimizer)
    if n:
        emit("flat_optimizer", tensors=n)
    else:
        emit("log", message=f"One optimizer update skipped: {type(optimizer).__name__}'s tensors cannot be merged "
             "(studio/speed/flat_optimizer.py says which can); each is updated on its own.")


def collator(plan: Plan, tokenizer, max_length: int):
    """Fixed [micro-batch, max_length] rows for CUDA graphs, one flattened row per micro-batch (padding-free), or
    rows padded to the longest of each micro-batch."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if plan.cuda_graphs:
        from studio.speed.graphs import StaticRowsCollator

        return StaticRowsCollator(plan.micro_batch, max_length, tokenizer.pad_token_id)
    if plan.padding_free:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")


def callback(plan: Plan, max_length: int, emit, ranks: int = 1):
    """A TrainerCallback that, at train begin (after Trainer enabled checkpointing and wrapped the model),
    installs offloaded checkpoints and captures CUDA graphs as ``plan`` says."""
    from transformers import TrainerCallback

    class SpeedCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            if model is None:
                return
            if plan.offload_checkpoints and plan.gradient_checkpointing and not plan.cuda_graphs:
                from studio.speed.offload import use_offloaded_checkpoints

                layers = use_offloaded_checkpoints(model)  # a graphed stack offloads inside its graph
                emit("checkpoint_offload", layers=layers, **_keep_up_proj(model, plan, max_length, ranks))
            if plan.cuda_graphs:
                _capture(model, plan, max_length, emit)

    return SpeedCallback()


def _keep_up_proj(model, plan: Plan, max_length: int, ranks: int) -> dict:
    """With ``offload_up_proj``, keep up_proj outputs in CPU RAM where it has room now (the plan checked the RAM
    free when it was made; this checks again as the run starts)."""
    import psutil

    from studio.speed.offload import keep_up_proj_if_room

    if not plan.offload_up_proj:
        return {}
    size = plan.dtype.itemsize
    return keep_up_proj_if_room(model, plan.micro_batch * max_length, size, psutil.virtual_memory().available,
                                4 if plan.fp32_frozen else size, ranks)


def _capture(model, plan: Plan, max_length: int, emit) -> None:
    import time

    import torch

    from studio.speed.graphs import UnsupportedModel, graph_layers

    t = time.time()
    try:
        n = graph_layers(model, plan.micro_batch, max_length, plan.dtype, offload=plan.offload_checkpoints)
    except UnsupportedModel as e:  # before anything was changed: the run goes on eagerly
        emit("log", message=f"CUDA graphs skipped: {e}")
        return
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"capturing CUDA graphs failed ({str(e).splitlines()[0]}); set speed.cuda_graphs to off "
                           "and start again.") from e
    emit("graphs", layers=n, shape=[plan.micro_batch, max_length], seconds=round(time.time() - t, 2),
         checkpointed=plan.gradient_checkpointing, offload=plan.offload_checkpoints,
         allocated_gib=round(torch.cuda.memory_allocated() / 2**30, 3),
         capture_peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3))
