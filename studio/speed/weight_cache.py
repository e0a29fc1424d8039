"""The 16-bit weight cache: every 4-bit linear layer keeps its dequantized weight on the GPU while training.

Contract: ``cache_dequantized(model, dtype) -> bytes added``.  The copy holds exactly the values bitsandbytes
dequantizes on every call, so outputs and gradients are the 4-bit layer's; the packed weight stays (adapters,
merging and saving use it) and the copy is never saved.  ``studio.speed.fused_lora`` reads it where present.
"""

from __future__ import annotations


def cache_dequantized(model, dtype) -> int:
    """Give every 4-bit linear layer a 16-bit copy of its dequantized weight and use it; returns bytes added.

    The copy holds exactly the values bitsandbytes dequantizes on every call, so outputs and gradients are
    those of the 4-bit layer; the packed 4-bit weight stays (adapters, merging and saving use it).
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import torch

    added = 0
    for m in model.modules():
        if not isinstance(m, bnb.nn.Linear4bit) or m.weight.device.type != "cuda":
            continue
        w = bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).to(dtype)
        m.register_buffer("weight16", w, persistent=False)  # never saved: checkpoints stay 4-bit

        def forward(x, _m=m):
            return torch.nn.functional.linear(x.to(_m.weight16.dtype), _m.weight16, _m.bias).to(x.dtype)

        m.forward = forward
        added += w.numel() * w.element_size()
    return added
