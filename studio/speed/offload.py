"""Gradient checkpointing that keeps each layer's saved input in CPU RAM instead of GPU memory.

Checkpointing keeps one tensor per decoder layer (its input) and recomputes the rest in the backward.
At 16k tokens per micro-batch that is 128 MiB a layer, 4 GiB for Mistral-7B's 32 layers: as much as
the 4-bit model itself.  Here that input is copied to pinned host memory on a side stream while the
layer computes, and copied back on the same side stream one layer ahead of the backward that needs
it, so the copies overlap compute and the GPU holds at most two layer inputs.  This is the technique
of Unsloth's "unsloth" checkpointing.

Contract:
- ``offloaded_checkpoint(run, hidden)`` has the signature of transformers' ``_gradient_checkpointing_func``
  for decoder layers (``run`` is the layer call with its keyword arguments bound, ``hidden`` its
  positional input).  It returns what ``run(hidden)`` returns (a tensor), recomputes in the backward
  under the forward's autocast state and RNG state (so LoRA dropout draws the same mask), and gives
  the LoRA weights the gradients plain checkpointing gives.  Without autograd it just calls ``run``.
- ``use_offloaded_checkpoints(model) -> int`` installs it on every checkpointed decoder layer (call it
  after ``gradient_checkpointing_enable``, which installs torch's) and returns how many.
- On a CPU "offloading" keeps a reference: the same code path runs, nothing moves.
- The recompute skips the layer's last matmul (``down_proj``): the backward needs that matmul's input,
  never its output, which only feeds the residual add whose backward reads no values.  That is 1/3 of
  the MLP's flops in every recompute.  ``skip_unused_output(model)`` marks ``down_proj`` of decoder
  layers known to end ``residual + mlp(x)`` (Llama, Mistral, Qwen2, Qwen3; anything else is left
  alone); ``recomputing()`` is true only inside this module's recomputes, so other calls run as ever.
- ``keep_up_proj(model) -> int`` (optional, with the above): in each such layer's checkpointed forward
  the MLP's ``up_proj`` output (the frozen 4-bit product, before any LoRA term) is copied to pinned host
  memory too, and its recompute takes that copy instead of the matmul; the backward is the matmul's
  own (``dx = dy W``, plus the LoRA terms, which are recomputed).  Another 1/3 of the MLP's recompute
  flops, for ``tokens x intermediate x 2`` bytes of host memory per layer (16k tokens of Mistral-7B:
  448 MiB a layer, a 512 MiB pinned block).  The copy back for layer i-1 starts in layer i's ``up_proj``
  backward, when layer i's copy is no longer needed, so the GPU holds one such output at a time.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref

# Decoder layers whose forward ends ``hidden = residual + mlp(hidden)`` with ``mlp`` ending in down_proj.
ENDS_WITH_DOWN_PROJ = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
_local = threading.local()
skipped = [0]  # down_proj matmuls skipped so far (tests check the recompute really skips them)
replayed = [0]  # up_proj outputs taken from host memory instead of recomputed


def recomputing() -> bool:
    """True inside a checkpoint recompute of this module (the backward will not read final outputs)."""
    return getattr(_local, "recomputing", False)


@contextlib.contextmanager
def recompute():
    _local.recomputing = True
    try:
        yield
    finally:
        _local.recomputing = False


class _Saved:
    """One layer input: on the host (or, on a CPU, in place) and, once fetched, back on its device.

    ``outputs`` holds that layer's kept ``up_proj`` outputs (each a ``_Saved``) in forward order, and
    ``previous`` (set in the backward) the layer whose backward comes next."""

    __slots__ = ("host", "device", "gpu", "ready", "outputs", "previous", "__weakref__")

    def __init__(self, host, device):
        self.host, self.device, self.gpu, self.ready = host, device, None, None
        self.outputs, self.previous = [], None


def current_layer():
    """The checkpointed layer whose forward or recompute is running on this thread, or None."""
    return getattr(_local, "layer", None)


@contextlib.contextmanager
def _in_layer(saved):
    _local.layer = saved
    try:
        yield
    finally:
        _local.layer = None


_stack: list = []  # weak references to saved inputs in forward order; the backward walks it in reverse
_streams: dict = {}


def _copy_stream(device):
    import torch

    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def _offload(x) -> _Saved:
    import torch

    if x.device.type != "cuda":
        return _Saved(x, x.device)
    stream = _copy_stream(x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))  # x is written by the compute stream
    with torch.cuda.stream(stream):
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        host.copy_(x, non_blocking=True)
    x.record_stream(stream)  # the allocator must not hand x's memory out before the copy has read it
    return _Saved(host, x.device)


def _prefetch(saved: _Saved) -> None:
    import torch

    if saved.gpu is not None or saved.device.type != "cuda":
        return
    stream = _copy_stream(saved.device)
    compute = torch.cuda.current_stream(saved.device)
    # Allocated on the compute stream, which frees it: a block allocated on the copy stream would go back to
    # that stream's own pool, and the two pools fragment the reserved memory.  The copy waits for the work
    # already queued, which may still be using the memory this block reuses.
    saved.gpu = torch.empty(saved.host.shape, dtype=saved.host.dtype, device=saved.device)
    stream.wait_stream(compute)
    with torch.cuda.stream(stream):
        saved.gpu.copy_(saved.host, non_blocking=True)
        saved.ready = torch.cuda.Event()
        saved.ready.record(stream)


def _fetch(saved: _Saved):
    import torch

    if saved.device.type != "cuda":
        return saved.host
    _prefetch(saved)
    compute = torch.cuda.current_stream(saved.device)
    compute.wait_event(saved.ready)
    x, saved.gpu = saved.gpu, None
    return x


def _previous_alive(saved: _Saved):
    """The saved input the backward will want next: the closest earlier one still held by a graph."""
    for i in range(len(_stack) - 1, -1, -1):
        s = _stack[i]()
        if s is saved:
            del _stack[i]
            for j in range(i - 1, -1, -1):
                prev = _stack[j]()
                if prev is not None:
                    return prev
            return None
    return None


def _function():
    import torch

    class OffloadedCheckpoint(torch.autograd.Function):
        @staticmethod
        def forward(ctx, run, hidden):
            dev = hidden.device.type
            ctx.run = run
            ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
            ctx.rng = torch.cuda.get_rng_state(hidden.device) if dev == "cuda" else torch.get_rng_state()
            ctx.saved = _offload(hidden)
            _stack[:] = [r for r in _stack if r() is not None]
            _stack.append(weakref.ref(ctx.saved))
            with torch.no_grad(), _in_layer(ctx.saved):
                return run(hidden)

        @staticmethod
        def backward(ctx, grad):
            saved = ctx.saved
            nxt = _previous_alive(saved)
            hidden = _fetch(saved).detach().requires_grad_(True)
            for out in saved.outputs:  # normally already on its way, sent for by the later layer's backward
                _prefetch(out)
            saved.previous = nxt
            if nxt is not None:
                _prefetch(nxt)  # the next backward's input crosses the bus while this layer recomputes
            dev, enabled, dtype = ctx.autocast
            devices = [hidden.device] if dev == "cuda" else []
            with torch.random.fork_rng(devices=devices, device_type=dev if dev == "cuda" else "cuda"):
                if dev == "cuda":
                    torch.cuda.set_rng_state(ctx.rng, hidden.device)
                else:
                    torch.set_rng_state(ctx.rng)
                with (torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled), recompute(),
                      _in_layer(saved)):
                    out = ctx.run(hidden)
            try:
                torch.autograd.backward(out, grad)
            except BaseException:
                # Buffers prefetched for layers whose backward will now never run are freed unfetched: their blocks
                # must not go back to the compute stream while a copy still writes them.  (Not record_stream on
                # every prefetch: that holds each fetched block until the copy stream has drained what was queued
                # after it, which grows reserved memory by a block per layer with kept up_proj products.)
                if hidden.is_cuda:
                    _copy_stream(hidden.device).synchronize()
                raise
            ctx.saved = ctx.run = None
            return None, hidden.grad

    return OffloadedCheckpoint


@functools.cache
def _fn():
    return _function()


def offloaded_checkpoint(run, hidden, *args, **kwargs):
    import torch

    if args or kwargs or not torch.is_tensor(hidden):
        raise TypeError("offloaded_checkpoint takes the layer call and its hidden-state tensor only")
    if not torch.is_grad_enabled():
        return run(hidden)
    return _fn().apply(run, hidden)


def kept_output(base):
    """In a recompute, the next kept output of ``base`` fetched back to its device, or None.

    Also in the checkpointed forward's role: ``keep_output`` stores them.  Layers not marked by
    ``keep_up_proj``, and every call outside a checkpointed layer, get None."""
    layer = current_layer()
    if layer is None or not getattr(base, "_keep_output", False) or not recomputing() or not layer.outputs:
        return None
    replayed[0] += 1
    return _fetch(layer.outputs.pop(0))


_in_flight: list = []  # copy-done events of the kept outputs still crossing to the host, oldest first
MAX_IN_FLIGHT = 1


def keep_output(base, out) -> None:
    """In a checkpointed layer's forward, send ``out`` (``base``'s output) to host memory for the recompute, in
    the layer's compute dtype: bitsandbytes computes in it and only then casts to the input's (fp32 under peft's
    k-bit preparation), so nothing is lost and half the bytes cross the bus.

    The GPU block of an output in flight is reusable only once its copy is done, and the host may run many
    layers ahead of the GPU: without a bound a slow bus would hold one 470 MB block per layer ahead.  So the
    host waits for the copy of the output MAX_IN_FLIGHT back (the GPU still has the layers since queued)."""
    import torch

    layer = current_layer()
    if layer is None or not getattr(base, "_keep_output", False) or recomputing():
        return
    saved = _offload(out.to(getattr(base, "compute_dtype", None) or out.dtype))
    layer.outputs.append(saved)
    if out.device.type == "cuda":
        done = torch.cuda.Event()
        done.record(_copy_stream(out.device))
        _in_flight.append(done)
        while len(_in_flight) > MAX_IN_FLIGHT:
            _in_flight.pop(0).synchronize()


def fetch_previous(layer) -> None:
    """From a kept output's backward: the layer whose backward comes next may bring its kept outputs now."""
    prev = layer.previous if layer is not None else None
    for out in prev.outputs if prev is not None else ():
        _prefetch(out)


def _frozen_cls():
    import torch

    class FrozenLinear4bit(torch.autograd.Function):
        """A frozen 4-bit linear layer without bias whose output is already known (kept), never read (empty), or,
        with ``compute``, its ordinary product ``x W^T`` in the compute dtype as bitsandbytes computes it in
        training.  The backward gives the input's gradient ``dy W``.  W is dequantized by
        ``fused_lora._dequantized``: into the device's shared buffer where the layer has one."""

        @staticmethod
        def forward(ctx, x, base, dtype, given=None, layer=None, compute=False):
            from studio.speed.fused_lora import _dequantized

            ctx.base, ctx.dtype, ctx.x_dtype, ctx.layer = base, dtype, x.dtype, layer
            if given:  # in a list, so not an input returned as-is: the forward's own product, in x's dtype as bnb gives
                return given.pop().to(x.dtype)
            if compute:
                with torch.autocast(x.device.type, enabled=False):
                    out = torch.mm(x.reshape(-1, x.shape[-1]).to(dtype), _dequantized(base, dtype).t())
                return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)
            return x.new_empty(*x.shape[:-1], base.out_features)

        @staticmethod
        def backward(ctx, dy):
            from studio.speed.fused_lora import _dequantized

            with torch.autocast(dy.device.type, enabled=False):
                w = _dequantized(ctx.base, ctx.dtype)
                dx = torch.mm(dy.reshape(-1, dy.shape[-1]).to(ctx.dtype), w)
            fetch_previous(ctx.layer)
            ctx.layer = None
            return dx.view(*dy.shape[:-1], dx.shape[-1]).to(ctx.x_dtype), None, None, None, None, None

    return FrozenLinear4bit


@functools.cache
def frozen_linear4bit():
    return _frozen_cls()


def _frozen_forward(base, forward, x, *args, **kwargs):
    import torch

    if args or kwargs:
        return forward(x, *args, **kwargs)
    if recomputing() and torch.is_grad_enabled():
        from studio.speed.fused_lora import compute_dtype

        given = kept_output(base)
        if given is not None:
            return frozen_linear4bit().apply(x, base, compute_dtype(x), [given], current_layer())
        if getattr(base, "_lazy", False):
            skipped[0] += 1
            return frozen_linear4bit().apply(x, base, compute_dtype(x))
        return forward(x)
    out = forward(x)
    keep_output(base, out)  # stores only in a checkpointed layer's forward, for a layer keep_up_proj marked
    return out


def _patch(base) -> None:
    if not getattr(base, "_frozen_patched", False):
        base.forward = functools.partial(_frozen_forward, base, base.forward)
        base._frozen_patched = True


def _base_4bit(module):
    """The frozen bitsandbytes 4-bit layer of ``module`` (itself, or under peft its base layer), or None."""
    import bitsandbytes as bnb

    base = getattr(module, "base_layer", module)
    if not isinstance(base, bnb.nn.Linear4bit) or base.bias is not None:
        return None
    return base


def skip_unused_output(model) -> int:
    """Mark the down_proj of every known decoder layer so recomputes skip its matmul; returns the count."""
    n = 0
    for m in model.modules():
        if type(m).__name__ not in ENDS_WITH_DOWN_PROJ:
            continue
        down = m.mlp.down_proj
        base = _base_4bit(down)
        if base is None or getattr(base, "_lazy", False):
            continue
        _patch(base)
        base._lazy = True
        down._unused_output = True  # the fused LoRA function skips its base matmul too
        n += 1
    return n


def keep_up_proj(model) -> int:
    """Mark the up_proj of every known decoder layer so its output is kept in host memory; returns the count.

    (Keeping ``o_proj``'s product too measured 0.7% slower at 16k tokens on an H100, bench run 18: the layer's
    copies to the host then fill its forward.)"""
    n = 0
    for m in model.modules():
        if type(m).__name__ not in ENDS_WITH_DOWN_PROJ:
            continue
        base = _base_4bit(m.mlp.up_proj)
        if base is None or getattr(base, "_keep_output", False):
            continue
        _patch(base)  # peft's own forward calls it; the fused LoRA function asks kept_output itself
        base._keep_output = True
        n += 1
    return n


def use_offloaded_checkpoints(model) -> int:
    from transformers.modeling_layers import GradientCheckpointingLayer

    skip_unused_output(model)
    n = 0
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
            m._gradient_checkpointing_func = offloaded_checkpoint
            n += 1
    return n


def keep_up_proj_if_room(model, tokens: int, dtype_bytes: int, free: int, residual_bytes: int | None = None,
                         ranks: int = 1) -> dict:
    """Keep up_proj outputs in CPU RAM if a micro-batch's worth, beside the offloaded layer inputs, fits in half of
    ``free`` bytes (pinned memory cannot be swapped out); what was done, for the ``checkpoint_offload`` event.

    Layer inputs are in the residual stream's dtype (fp32 under peft's k-bit preparation), kept products in the
    compute dtype; the pinned-memory allocator rounds each block up to a power of two; every rank on the machine
    keeps its own."""
    c = model.config.get_text_config()

    def block(n: int) -> int:
        return 1 << (n - 1).bit_length()

    per_layer = block(tokens * c.hidden_size * (residual_bytes or dtype_bytes)) + block(
        tokens * c.intermediate_size * dtype_bytes)
    need = c.num_hidden_layers * per_layer * ranks
    if need > free / 2:
        return {"up_proj": 0, "up_proj_note": f"needs {need / 2**30:.1f} GiB of CPU RAM, {free / 2**30:.1f} GiB free: "
                "recomputed on the GPU instead"}
    return {"up_proj": keep_up_proj(model), "host_gib": round(need / 2**30, 2)}
