"""LoRA on a 4-bit linear layer as one autograd function: fewer full-size passes, same arithmetic.

peft computes a LoRA'd 4-bit layer as ``clone(base(x)) + B(A(dropout(x))) * scale``: besides the
matmuls that is a clone, a scale and an add over the whole [tokens, out_features] output in the
forward, the same again in the recompute of gradient checkpointing, and their mirror in the
backward.  At 16k tokens per micro-batch on all seven Mistral projections those passes cost about as
much as the LoRA matmuls themselves.  Here the LoRA product is added inside the base matmul's output
buffer (``addmm_`` with ``alpha=scale``) and the backward is written out by hand, as Unsloth does:

    y  = x W^T + scale * (d A^T) B^T         W = dequantize(nf4),  d = dropout(x) = x * mask / (1 - p)
    dA = scale * ((dy B)^T d)      dB = scale * dy^T (d A^T)      dx = dy W + scale * ((dy B) A) * mask / (1 - p)

With dropout 0 there is no mask and ``d`` is ``x`` itself (nothing extra saved).  With dropout the mask
is drawn by the kernel peft's ``nn.Dropout`` uses (``native_dropout``, the same random draws), and the
backward keeps ``d`` and the boolean mask, as peft's own graph does.

Contract:
- ``fuse_lora(model) -> int`` patches every peft ``Linear4bit`` LoRA layer whose adapter is plain LoRA
  (no DoRA or other variant, no bias on the base layer; dropout any p) and returns how many it patched.
  A patched layer takes the fused path only while training with autograd on, one active adapter,
  unmerged; anything else (evaluation, generation, adapters switched off) runs peft's own forward.
- In a recompute of ``studio.speed.offload`` the base matmul is skipped where its output is never read
  (``down_proj``) or was kept in host memory (``up_proj`` under ``keep_up_proj``): the LoRA term is then
  added to the kept product.
- Matmuls run in the compute dtype (autocast's, else x's); the fp32 LoRA weights get fp32 gradients.
  The frozen weight is dequantized again in the backward (or read from ``weight16`` when
  ``weight_cache.cache_dequantized`` gave the layer one) so nothing weight-sized is saved.
- Loss and LoRA gradients equal peft's within bf16 rounding, dropout included: under the same seed the
  masks are peft's (tests compare both paths).
- ``share_dequant_buffer(model, dtype) -> bytes``: every 4-bit layer's weight is dequantized into one
  buffer per device (the largest weight's size) instead of a new tensor per call; frozen layers then run
  through ``offload.frozen_linear4bit`` (bitsandbytes' own arithmetic) on more than one token.  Call it before capturing
  CUDA graphs.
"""

from __future__ import annotations

import functools

from studio.speed.offload import current_layer, fetch_previous, frozen_linear4bit, kept_output, recomputing, skipped


def _dequantized(base, dtype):
    """``base``'s weight in ``dtype``: its 16-bit cache, a view of its device's shared buffer, or a new tensor.

    A view of the shared buffer is valid until the next dequantization on that device: every caller reads it in
    the one matmul it queues next, on the same stream, before any other layer's weight is written over it."""
    import bitsandbytes.functional as bnbf

    w16 = getattr(base, "weight16", None)
    if w16 is not None:
        return w16 if w16.dtype == dtype else w16.to(dtype)
    qs = base.weight.quant_state
    scratch = getattr(base, "_dequant_scratch", None)
    if scratch is not None and scratch.dtype == dtype == qs.dtype:
        view = scratch[: qs.shape.numel()].view(qs.shape)
        if view.device.type != "cuda":  # bitsandbytes has no out= kernel there: a copy keeps the same aliasing
            return view.copy_(bnbf.dequantize_4bit(base.weight.data, qs))
        return bnbf.dequantize_4bit(base.weight.data, qs, out=view)
    return bnbf.dequantize_4bit(base.weight.data, qs).to(dtype)


def compute_dtype(x):
    """The dtype matmuls on ``x`` run in: autocast's where it is on, else x's own."""
    import torch

    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _function():
    import torch

    class LoraNF4(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, A, B, base, scale, dtype, p=0.0, skip_output=False, given=None, layer=None):
            shape = x.shape
            n = base.out_features
            x2 = x.reshape(-1, shape[-1])
            mask = None
            if p > 0:
                # peft's nn.Dropout draws with this kernel, on x cast to lora_A's dtype unless CUDA autocast is on
                # (peft's rule): the same mask under the same seed, also in a recompute after peft's own forward.
                src = x2 if torch.is_autocast_enabled() else x2.to(A.dtype)
                xd, mask = torch.ops.aten.native_dropout(src, p, True)
                xd = xd.to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                x2 = x2.to(dtype)
                xa = torch.mm(x2 if mask is None else xd, A.to(dtype).t())  # the backward's dB needs it
                # The output is a whole tensor, never a view, so later in-place ops on it are autograd's to handle.
                if skip_output:  # a recompute whose backward never reads this output (studio.speed.offload)
                    out = x2.new_empty(*shape[:-1], n)
                else:
                    if given:  # a recompute given the base product kept from the forward (studio.speed.offload)
                        out = given.pop().to(dtype)
                    else:
                        out = x2.new_empty(*shape[:-1], n, dtype=dtype)
                        W = _dequantized(base, dtype)
                        torch.mm(x2, W.t(), out=out.view(-1, n))  # the base matmul reads x, not dropout(x)
                        del W  # weight-sized: freed before the LoRA product, not saved
                    out.view(-1, n).addmm_(xa, B.to(dtype).t(), alpha=scale)
            ctx.save_for_backward(x2 if mask is None else xd, xa, A, B, mask)
            ctx.base, ctx.scale, ctx.dtype, ctx.x_dtype, ctx.p, ctx.layer = base, scale, dtype, x.dtype, p, layer
            return out

        @staticmethod
        def backward(ctx, dy):
            x2, xa, A, B, mask = ctx.saved_tensors  # x2 is dropout(x) when p > 0
            dt, s = ctx.dtype, ctx.scale
            dy2 = dy.reshape(-1, dy.shape[-1]).to(dt)
            with torch.autocast(dy.device.type, enabled=False):
                dxa = torch.mm(dy2, B.to(dt))  # [tokens, r]
                dB = torch.mm(dy2.t(), xa).mul_(s) if B.requires_grad else None
                dA = torch.mm(dxa.t(), x2).mul_(s) if A.requires_grad else None
                dx = None
                if ctx.needs_input_grad[0]:
                    dx = torch.mm(dy2, _dequantized(ctx.base, dt))
                    if mask is None:
                        dx.addmm_(dxa, A.to(dt), alpha=s)
                    else:  # the LoRA branch's gradient passes the dropout: kept entries, scaled by 1/(1-p)
                        lora = torch.ops.aten.native_dropout_backward(torch.mm(dxa, A.to(dt)), mask, 1.0 / (1.0 - ctx.p))
                        dx.add_(lora, alpha=s)
                    dx = dx.view(*dy.shape[:-1], dx.shape[-1]).to(ctx.x_dtype)
            fetch_previous(ctx.layer)
            ctx.layer = None
            return (dx, dA.to(A.dtype) if dA is not None else None, dB.to(B.dtype) if dB is not None else None,
                    None, None, None, None, None, None, None)

    return LoraNF4


@functools.cache
def lora_nf4():
    return _function()


def fusable(layer) -> bool:
    """A peft 4-bit LoRA layer with plain LoRA adapters, no base bias and plain (or no) dropout."""
    import torch

    base = getattr(layer, "base_layer", None)
    if base is None or getattr(base, "bias", None) is not None or not hasattr(base.weight, "quant_state"):
        return False
    if getattr(layer, "lora_variant", None):  # DoRA and other variants keep peft's forward
        return False
    return all(type(d) in (torch.nn.Identity, torch.nn.Dropout) for d in layer.lora_dropout.values())


def _fused_forward(layer, peft_forward, x, *args, **kwargs):
    import torch

    adapters = layer.active_adapters
    if (args or kwargs or not layer.training or not torch.is_grad_enabled() or layer.disable_adapters
            or layer.merged or len(adapters) != 1 or adapters[0] not in layer.lora_A):
        return peft_forward(x, *args, **kwargs)
    name = adapters[0]
    skip = getattr(layer, "_unused_output", False) and recomputing()
    if skip:
        skipped[0] += 1
    kept = None if skip else kept_output(layer.base_layer)
    given = [kept] if kept is not None else None  # in a list: not a tensor input of the autograd function
    p = float(getattr(layer.lora_dropout[name], "p", 0.0))
    return lora_nf4().apply(x, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.base_layer,
                            float(layer.scaling[name]), compute_dtype(x), p, skip, given,
                            current_layer() if given else None)


def fuse_lora(model) -> int:
    """Route every fusable 4-bit LoRA layer of ``model`` through the fused function; returns the count."""
    from peft.tuners.lora.bnb import Linear4bit

    n = 0
    for m in model.modules():
        if isinstance(m, Linear4bit) and fusable(m) and not getattr(m, "_fused_lora", False):
            m.forward = functools.partial(_fused_forward, m, m.forward)
            m._fused_lora = True
            n += 1
    return n


def _shared_forward(base, forward, x, *args, **kwargs):
    import torch

    qs = getattr(base.weight, "quant_state", None)
    # One token at a time keeps bitsandbytes' own path (its one-token kernel reads the 4-bit weight directly, with
    # nothing dequantized), and so does a CPU weight repacked for inference.
    if (args or kwargs or qs is None or getattr(qs, "packing_format_for_cpu", False)
            or x.numel() == x.shape[-1]):
        return forward(x, *args, **kwargs)
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else (base.compute_dtype or x.dtype)
    return frozen_linear4bit().apply(x, base, dtype, None, None, True)  # computed, from the shared buffer


def share_dequant_buffer(model, dtype) -> int:
    """Dequantize every 4-bit layer (no bias, no 16-bit cache) of ``model`` into one buffer per device; returns
    the bytes allocated.

    bitsandbytes allocates a new weight-sized tensor for every dequantization (112 MiB for a Mistral-7B MLP
    projection, several per layer per pass); inside a CUDA graph's private memory pool, which does not use
    expandable segments, those blocks fragment the pool.  One buffer of the largest weight, allocated here
    (before any capture), is written and read in stream order instead: the fused LoRA path and the frozen
    layers (``offload.frozen_linear4bit``, on more than one token) take their weights from it.  Layers whose weights
    dequantize to another dtype keep their own allocations."""
    import bitsandbytes as bnb
    import torch

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.bias is None
              and getattr(m, "weight16", None) is None and getattr(m.weight, "quant_state", None) is not None
              and m.weight.quant_state.dtype == dtype]
    size: dict = {}
    for m in layers:
        dev = m.weight.device
        size[dev] = max(size.get(dev, 0), m.weight.quant_state.shape.numel())
    buffers = {dev: torch.empty(n, dtype=dtype, device=dev) for dev, n in size.items()}
    for m in layers:
        m._dequant_scratch = buffers[m.weight.device]
        if not getattr(m, "_shared_patched", False):
            m.forward = functools.partial(_shared_forward, m, m.forward)
            m._shared_patched = True
    return sum(b.numel() * b.element_size() for b in buffers.values())
