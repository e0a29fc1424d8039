"""CUDA graphs for the decoder layers of a (LoRA-wrapped) causal LM: the cure for host-bound small steps.

A QLoRA step on short rows (the fast preset: 8 examples of at most 128 tokens) launches thousands of
small kernels (4-bit dequantisation, LoRA, norms, rotary) and the GPU mostly waits for Python between
them.  Capturing each decoder layer's forward and backward once with
``torch.cuda.make_graphed_callables`` and replaying them removes that wait.  Replay needs identical
shapes, so every training micro-batch is exactly [batch_size, max_length] (``StaticRowsCollator``):
one example per row, right-padded, labels -100 on the padding, and no attention mask.  Attention is
causal, so a real token never sees the padding that follows it: the loss and gradients are those of
the same examples padded with a mask, and the causal flash kernel runs instead of a masked one.

Contract:
- ``StaticRowsCollator(batch_size, length, pad_token_id)`` -> ``input_ids`` and ``labels`` of shape
  [batch_size, length] (missing rows are all padding, labels -100).
- ``graph_layers(model, batch_size, length, dtype)`` captures every decoder layer (CUDA, training mode)
  and counts replays in ``base_model.graph_replays[0]``.  A layer replays its graph only in training
  mode with gradients on, no attention mask and the captured shapes; anything else (evaluation,
  sample answers, generation) runs the layer eagerly.
- Without gradient checkpointing each layer is its own graph.  With it, the whole stack of layers is
  one graph in which every layer is checkpointed (torch's non-reentrant checkpoint, recomputed inside
  the backward graph): one graph keeps the memory of eager checkpointing, where per-layer graphs would
  each hold static input, output and gradient buffers.  The first layer runs the stack and the others
  pass its result through.  Recomputation inside a graph cannot replay a dropout mask, so this needs
  LoRA dropout 0 (the planner, ``studio.speed.planner``, keeps to that).  With ``offload`` the saved layer inputs go to
  pinned host memory inside the graph (copies on a side stream, the backward's fetched one layer ahead).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


def _unwrapped(model):
    """The transformers model under any peft wrapping."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class UnsupportedModel(ValueError):
    """The model has no Llama-style decoder layers to capture; raised before anything is changed."""


def decoder_layers(model):
    """The decoder layers of a transformers causal LM, under any peft wrapping."""
    base = _unwrapped(model)
    inner = getattr(base, "model", base)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UnsupportedModel(f"{type(base).__name__} has no decoder layers at .model.layers; CUDA graphs need a "
                               "Llama-style model (Llama, Mistral, Qwen, Gemma...).")
    return list(layers)


@dataclass
class StaticRowsCollator:
    """One example per row, right-padded to ``length``; at least ``batch_size`` rows (a larger evaluation batch
    keeps every example: it runs eagerly, the graphs replay only the training shape)."""

    batch_size: int
    length: int
    pad_token_id: int = 0

    def __call__(self, features):
        import torch

        rows = max(self.batch_size, len(features))
        ids = torch.full((rows, self.length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((rows, self.length), -100, dtype=torch.long)
        for i, f in enumerate(features):
            x = list(f["input_ids"])[: self.length]
            y = list(f.get("labels", x))[: len(x)]
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
        return {"input_ids": ids, "labels": labels}


def _layer_call_cls():
    import torch

    class LayerCall(torch.nn.Module):
        """Positional tensors in, tensor out: the form make_graphed_callables captures."""

        def __init__(self, layer, eager):
            super().__init__()
            self.layer = layer  # registered so its parameters (the LoRA weights) get gradients
            self.eager = eager

        def forward(self, hidden, cos, sin):
            return self.eager(hidden, attention_mask=None, position_embeddings=(cos, sin))

    return LayerCall


def layer_inputs(model, batch_size: int, length: int, dtype) -> list[tuple]:
    """Per decoder layer: (hidden dtype, hidden requires grad, rotary dtype, rotary shape) in a training step.

    Dtypes and shapes come from one sample forward without autograd: an eager backward here would leave
    gradient-accumulation nodes on the default stream that the capture's backward can then depend on
    (cudaErrorStreamCaptureImplicit).  Whether a layer's input needs a gradient is derived instead: the
    first layer's if the embeddings' output does (enable_input_require_grads), each later layer's if any
    earlier layer has trainable weights.
    """
    import torch

    layers = decoder_layers(model)
    seen: dict[int, tuple] = {}

    def hook(i):
        def pre(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            cos, _ = kwargs["position_embeddings"]
            seen[i] = (h.dtype, cos.dtype, tuple(cos.shape))
        return pre

    hooks = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(p for p in layers[0].parameters()).device
    ids = torch.randint(3, 100, (batch_size, length), device=device)
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    with torch.enable_grad():
        grad_in = model.get_input_embeddings()(ids[:, :1]).requires_grad
    specs = []
    for i, layer in enumerate(layers):
        h_dtype, c_dtype, c_shape = seen[i]
        specs.append((h_dtype, grad_in, c_dtype, c_shape))
        grad_in = grad_in or any(p.requires_grad for p in layer.parameters())
    return specs


def _sample(base, spec, batch_size: int, length: int, device):
    """A capture input for a layer (or the stack) with ``spec`` from ``layer_inputs``: hidden, cos, sin."""
    import torch

    h_dtype, h_grad, c_dtype, c_shape = spec
    h = torch.randn(batch_size, length, base.config.hidden_size, device=device, dtype=h_dtype).requires_grad_(h_grad)
    cos, sin = base.model.rotary_emb(h, torch.arange(length, device=device)[None])
    return h, cos.to(c_dtype).expand(c_shape).contiguous(), sin.to(c_dtype).expand(c_shape).contiguous()


def _capture(model, callables: tuple, samples: tuple, dtype) -> tuple:
    """``make_graphed_callables`` under the compute dtype's autocast; the warm-up's gradients are dropped."""
    import torch

    torch.cuda.synchronize()
    # cache_enabled=False: autocast's weight-cast cache would keep tensors alive outside the graphs' pool.
    with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(callables, samples, num_warmup_iters=3)
    model.zero_grad(set_to_none=True)
    return graphed


def _replayable(layer, hidden_states, attention_mask, position_embeddings, shape, c_shape) -> bool:
    """A training call with autograd, no mask and the captured shapes: the graph may replay it."""
    import torch

    return (layer.training and torch.is_grad_enabled() and attention_mask is None
            and tuple(hidden_states.shape) == shape and position_embeddings is not None
            and tuple(position_embeddings[0].shape) == c_shape)


def graph_layers(model, batch_size: int, length: int, dtype, offload: bool = False):
    """Capture every decoder layer of ``model`` as CUDA graphs for [batch_size, length] micro-batches.

    ``offload`` (checkpointed layers only): the saved layer inputs live in pinned host memory."""

    layers = decoder_layers(model)
    if any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        return graph_checkpointed_stack(model, batch_size, length, dtype, offload)
    was_training = model.training
    model.train()
    specs = layer_inputs(model, batch_size, length, dtype)
    device = next(p for p in layers[0].parameters()).device
    base = _unwrapped(model)
    LayerCall = _layer_call_cls()
    calls = tuple(LayerCall(layer, layer.forward) for layer in layers)
    graphed = _capture(model, calls, tuple(_sample(base, spec, batch_size, length, device) for spec in specs), dtype)
    shape = (batch_size, length, base.config.hidden_size)
    stats = base.__dict__.setdefault("graph_replays", [0])  # layer replays so far: tests check graphs really run
    for layer, call, (_, _, _, c_shape) in zip(layers, graphed, specs):
        eager = call.eager

        def forward(hidden_states, attention_mask=None, position_embeddings=None, _eager=eager, _call=call,
                    _layer=layer, _c_shape=c_shape, **kw):
            if _replayable(_layer, hidden_states, attention_mask, position_embeddings, shape, _c_shape):
                stats[0] += 1
                return _call(hidden_states, *position_embeddings)
            return _eager(hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings,
                          **kw)

        layer.forward = forward
    model.train(was_training)
    return len(layers)


def _stack_call_cls():
    import torch
    from torch.utils.checkpoint import checkpoint

    class StackCall(torch.nn.Module):
        """All decoder layers, each checkpointed, as one positional callable."""

        def __init__(self, layers, eagers):
            super().__init__()
            self.layers = torch.nn.ModuleList(layers)  # registered so the LoRA weights get gradients
            self.eagers = eagers

        def forward(self, hidden, cos, sin):
            for eager in self.eagers:
                hidden = checkpoint(lambda h, c, s, _f=eager: _f(h, attention_mask=None, position_embeddings=(c, s)),
                                    hidden, cos, sin, use_reentrant=False, preserve_rng_state=False)
            return hidden

    return StackCall


def _offloaded_stack_cls():
    import torch

    from studio.speed.offload import recompute

    class OffloadedStack(torch.autograd.Function):
        """The checkpointed stack with its saved layer inputs in pinned host memory, written for capture.

        Forward: each layer's input is copied to its static host slot on a side stream while the layer
        runs (no autograd).  Backward: layer i-1's input is copied back into one of two static GPU
        buffers on the side stream while layer i recomputes and back-propagates; events order the two
        streams, so inside the graph they become edges and the copies overlap compute.  Only two layer
        inputs are on the GPU during the backward instead of every one."""

        @staticmethod
        def forward(ctx, stack, hidden, cos, sin, *params):
            compute, side = torch.cuda.current_stream(), stack.stream
            # An input may be freed (and its memory reused by the compute stream) only once the side stream
            # has copied it: the compute stream waits for that copy one layer later, when it has long finished.
            pending = []  # (input, its copy's event), at most two
            h = hidden
            for i, eager in enumerate(stack.eagers):
                side.wait_stream(compute)
                done = torch.cuda.Event()
                with torch.cuda.stream(side):
                    stack.host[i].copy_(h, non_blocking=True)
                    done.record(side)
                pending.append((h, done))
                if len(pending) > 2:
                    compute.wait_event(pending.pop(0)[1])
                h = eager(h, attention_mask=None, position_embeddings=(cos, sin))
            compute.wait_stream(side)
            pending.clear()
            ctx.stack = stack
            ctx.autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
            ctx.save_for_backward(cos, sin)
            return h

        @staticmethod
        def backward(ctx, grad):
            stack = ctx.stack
            cos, sin = ctx.saved_tensors
            compute, side = torch.cuda.current_stream(), stack.stream
            n = len(stack.eagers)

            def fetch(i):
                side.wait_stream(compute)  # the buffer's previous reader (layer i+2's backward) is queued before
                with torch.cuda.stream(side):
                    stack.gpu[i % 2].copy_(stack.host[i], non_blocking=True)
                    stack.ready[i % 2].record(side)

            fetch(n - 1)
            param_grads: list = []
            enabled, dtype = ctx.autocast
            for i in range(n - 1, -1, -1):
                compute.wait_event(stack.ready[i % 2])
                if i > 0:
                    fetch(i - 1)
                h = stack.gpu[i % 2].detach().requires_grad_(True)
                own = stack.params[i]
                with torch.enable_grad(), torch.autocast("cuda", dtype=dtype, enabled=enabled), recompute():
                    out = stack.eagers[i](h, attention_mask=None, position_embeddings=(cos, sin))
                grads = torch.autograd.grad(out, (h, *own), grad, allow_unused=True)
                grad = grads[0]
                param_grads[:0] = grads[1:]
            return (None, grad if ctx.needs_input_grad[1] else None, None, None, *param_grads)

    return OffloadedStack


def _offloaded_stack_call_cls():
    import torch

    OffloadedStack = _offloaded_stack_cls()

    class OffloadedStackCall(torch.nn.Module):
        def __init__(self, layers, eagers, sample):
            super().__init__()
            self.layers = torch.nn.ModuleList(layers)
            self.eagers = eagers
            self.params = [[p for p in layer.parameters() if p.requires_grad] for layer in layers]
            h = sample
            self.stream = torch.cuda.Stream(h.device)
            self.host = torch.empty((len(layers), *h.shape), dtype=h.dtype, pin_memory=True)
            self.gpu = [torch.empty_like(h), torch.empty_like(h)]
            self.ready = [torch.cuda.Event(), torch.cuda.Event()]

        def forward(self, hidden, cos, sin):
            return OffloadedStack.apply(self, hidden, cos, sin, *[p for ps in self.params for p in ps])

    return OffloadedStackCall


def graph_checkpointed_stack(model, batch_size: int, length: int, dtype, offload: bool = False):
    """One CUDA graph for the whole checkpointed layer stack; see the module docstring."""

    layers = decoder_layers(model)
    was_training = model.training
    model.train()
    spec = layer_inputs(model, batch_size, length, dtype)[0]
    device = next(p for p in layers[0].parameters()).device
    base = _unwrapped(model)
    sample = _sample(base, spec, batch_size, length, device)
    eagers = [layer.forward for layer in layers]
    for layer in layers:
        layer.gradient_checkpointing = False  # the checkpointing now happens inside the graph
    if offload:
        from studio.speed.offload import skip_unused_output

        skip_unused_output(model)  # the recomputes below skip down_proj's matmul, as offloaded_checkpoint's do
        stack = _offloaded_stack_call_cls()(layers, eagers, sample[0].detach())
    else:
        stack = _stack_call_cls()(layers, eagers)
    (graphed,) = _capture(model, (stack,), (sample,), dtype)
    shape, c_shape = tuple(sample[0].shape), spec[3]
    stats = base.__dict__.setdefault("graph_replays", [0])
    passing = [0]  # layers still to pass the stack's output through in this forward

    def first(hidden_states, attention_mask=None, position_embeddings=None, **kw):
        if _replayable(layers[0], hidden_states, attention_mask, position_embeddings, shape, c_shape):
            stats[0] += 1
            passing[0] = len(layers) - 1
            return graphed(hidden_states, *position_embeddings)
        passing[0] = 0
        return eagers[0](hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings, **kw)

    def later(hidden_states, *args, _eager=None, **kw):
        if passing[0] > 0:
            passing[0] -= 1
            return hidden_states
        return _eager(hidden_states, *args, **kw)

    layers[0].forward = first
    for layer, eager in zip(layers[1:], eagers[1:]):
        layer.forward = functools.partial(later, _eager=eager)
    model.train(was_training)
    return len(layers)
