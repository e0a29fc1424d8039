"""Liger's fused kernels on one model instance, and nowhere else in the process.

Liger's own ``apply_liger_kernel_to_<model>`` (and Trainer's ``use_liger_kernel``, which calls it) also
rebinds names in transformers' modeling module: the RMSNorm and MLP classes and ``apply_rotary_pos_emb``.
Every model built afterwards in that process, the app's Playground model or a tiny CPU model included, then
runs Triton kernels, which fail on CPU tensors.  Here the kernels go on this instance's modules only:

- RMSNorm, SwiGLU MLP and the fused linear cross-entropy forward: Liger patches instances for these.
- RoPE: each attention module gets its own copy of its class's forward whose global
  ``apply_rotary_pos_emb`` is Liger's (same code, other globals), since Liger patches RoPE only module-wide.

The per-layer kernels (RMSNorm, SwiGLU, RoPE) run where autograd is on: training and the captured graphs.
Without gradients (evaluation, the sample answers written at each evaluation) each module runs its own
transformers code: Liger's Triton launches cost about 100 us of host time each, against the 1-3 us of GPU work
of a decoding step's kernels (``bench.profile_step --samples``: 129 of them a token), and a new shape compiles
its kernels again mid-run.  The fused linear cross-entropy stays: an evaluation that only wants the loss never
builds logits with it.

With ``fused_loss=False`` the loss stays transformers' own (CUDA graphs: Liger's fused loss counts the labels
with ``.item()``, a wait for the GPU in every step that leaves it idle while the host catches up).

Contract: ``apply_liger(model, fused_loss=True)`` returns what it applied (a list of kernel names); transformers' modules are
left exactly as they were.
"""

from __future__ import annotations

import sys
import types


def _with_liger_rope(forward, rope):
    """``forward``'s code with ``apply_rotary_pos_emb`` bound to Liger's in its own globals."""
    g = {**forward.__globals__, "apply_rotary_pos_emb": rope}
    new = types.FunctionType(forward.__code__, g, forward.__name__, forward.__defaults__, forward.__closure__)
    new.__kwdefaults__ = forward.__kwdefaults__
    new.__dict__.update(forward.__dict__)
    return new


def _when_training(module) -> None:
    """``module``'s instance forward (Liger's) where autograd is on, its class's own forward otherwise."""
    import torch

    liger, own = module.__dict__["forward"], types.MethodType(type(module).forward, module)

    def forward(*args, **kwargs):
        return (liger if torch.is_grad_enabled() else own)(*args, **kwargs)

    module.forward = forward


def apply_liger(model, fused_loss: bool = True) -> list[str]:
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    module = sys.modules[type(base).__module__]
    before = dict(vars(module))
    applied = []
    try:
        _apply_liger_kernel_to_instance(model=base, rope=False, rms_norm=True, swiglu=True,
                                        fused_linear_cross_entropy=fused_loss, cross_entropy=False)
    finally:
        # Whatever Liger rebound in the modeling module goes back: other models in this process keep theirs.
        for name, value in before.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
        for name in set(vars(module)) - set(before):
            delattr(module, name)
    if "forward" in base.__dict__:
        applied.append("fused_linear_cross_entropy")
    swiglu = [m for m in base.modules() if "_get_name" in m.__dict__ and "Liger" in m._get_name()]
    norms = [m for m in base.modules() if "forward" in m.__dict__ and "RMSNorm" in type(m).__name__]
    for m in swiglu + norms:
        _when_training(m)
    if swiglu:
        applied.append("swiglu")
    if norms:
        applied.append("rms_norm")
    ropes = 0
    for m in base.modules():
        fwd = type(m).forward
        if "apply_rotary_pos_emb" in fwd.__code__.co_names and fwd.__globals__ is vars(module):
            m.forward = types.MethodType(_with_liger_rope(fwd, liger_rotary_pos_emb), m)
            _when_training(m)
            ropes += 1
    if ropes:
        applied.append("rope")
    return applied

