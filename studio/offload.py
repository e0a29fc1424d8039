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
"""

from __future__ import annotations

import functools
import weakref


class _Saved:
    """One layer input: on the host (or, on a CPU, in place) and, once fetched, back on its device."""

    __slots__ = ("host", "device", "gpu", "ready", "__weakref__")

    def __init__(self, host, device):
        self.host, self.device, self.gpu, self.ready = host, device, None, None


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
    with torch.cuda.stream(stream):
        saved.gpu = saved.host.to(saved.device, non_blocking=True)
        saved.ready = torch.cuda.Event()
        saved.ready.record(stream)


def _fetch(saved: _Saved):
    import torch

    if saved.device.type != "cuda":
        return saved.host
    _prefetch(saved)
    compute = torch.cuda.current_stream(saved.device)
    compute.wait_event(saved.ready)
    x = saved.gpu
    x.record_stream(compute)  # allocated on the copy stream, used and freed on the compute stream
    saved.gpu = None
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
            with torch.no_grad():
                return run(hidden)

        @staticmethod
        def backward(ctx, grad):
            saved = ctx.saved
            nxt = _previous_alive(saved)
            hidden = _fetch(saved).detach().requires_grad_(True)
            if nxt is not None:
                _prefetch(nxt)  # the next backward's input crosses the bus while this layer recomputes
            dev, enabled, dtype = ctx.autocast
            devices = [hidden.device] if dev == "cuda" else []
            with torch.random.fork_rng(devices=devices, device_type=dev if dev == "cuda" else "cuda"):
                if dev == "cuda":
                    torch.cuda.set_rng_state(ctx.rng, hidden.device)
                else:
                    torch.set_rng_state(ctx.rng)
                with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                    out = ctx.run(hidden)
            torch.autograd.backward(out, grad)
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


def use_offloaded_checkpoints(model) -> int:
    from transformers.modeling_layers import GradientCheckpointingLayer

    n = 0
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
            m._gradient_checkpointing_func = offloaded_checkpoint
            n += 1
    return n
