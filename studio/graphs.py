"""CUDA graphs for the decoder layers of a (LoRA-wrapped) causal LM: the cure for host-bound small steps.

A QLoRA step on short rows (the fast preset: 8 examples of at most 128 tokens) launches thousands of
small kernels (4-bit dequantisation, LoRA, norms, rotary) and the GPU mostly waits for Python between
them.  Capturing each decoder layer's forward and backward once with
``torch.cuda.make_graphed_callables`` and replaying them removes that wait.  Replay needs identical
shapes, so training micro-batches are packed padding-free and then padded to a fixed token count
(``StaticPackCollator``).  The padding is its own segment with labels -100, and every segment attends
only to itself through a block-diagonal causal mask built from the position ids, so what is learned is
what the padding-free path learns.

Contract:
- ``StaticPackCollator(capacity)`` turns examples (input_ids, labels) into ``input_ids``, ``labels``,
  ``position_ids`` of shape [1, capacity]; the first token of each example gets label -100.
- ``block_causal_mask(position_ids)`` -> bool [B, 1, T, T], True where attention is allowed.
- ``use_block_mask(model)`` makes every decoder layer attend with that mask (eager, any device): the
  CPU-testable half of what ``graph_layers`` does.
- ``graph_layers(model, capacity, dtype)`` captures every decoder layer (CUDA, training mode,
  gradient checkpointing off, no hooks on the layers).  A layer replays its graph only in training
  mode with gradients on and the captured shape; anything else (evaluation, sample answers,
  generation) runs the layer eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass


def decoder_layers(model):
    """The decoder layers of a transformers causal LM, under any peft wrapping."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(base).__name__} has no decoder layers at .model.layers; CUDA graphs need a "
                         "Llama-style model (Llama, Mistral, Qwen, Gemma...). Turn train.cuda_graphs off.")
    return list(layers)


def block_causal_mask(position_ids):
    """True where token i may attend token j: same example (position ids restart at 0) and j <= i."""
    import torch

    seg = (position_ids == 0).cumsum(-1)
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


@dataclass
class StaticPackCollator:
    """Padding-free packing to exactly ``capacity`` tokens (examples longer than it are cut)."""

    capacity: int
    pad_token_id: int = 0

    def __call__(self, features):
        import torch

        ids, labels, pos = [], [], []
        for f in features:
            x = list(f["input_ids"])[: self.capacity - len(ids)]
            if not x:
                break
            y = list(f.get("labels", x))[: len(x)]
            ids += x
            labels += [-100] + y[1:]  # the first token is never predicted from the previous example
            pos += range(len(x))
        n = self.capacity - len(ids)
        ids += [self.pad_token_id] * n
        labels += [-100] * n
        pos += range(n)  # the padding is one more segment: nothing attends to it, it predicts nothing
        t = lambda v: torch.tensor([v], dtype=torch.long)  # noqa: E731
        return {"input_ids": t(ids), "labels": t(labels), "position_ids": t(pos)}


class _MaskCache:
    """One mask per step: every layer receives the same position_ids tensor."""

    def __init__(self):
        self.key = None
        self.mask = None

    def __call__(self, position_ids):
        key = (position_ids.data_ptr(), position_ids._version, tuple(position_ids.shape))
        if key != self.key:
            self.key, self.mask = key, block_causal_mask(position_ids)
        return self.mask


def use_block_mask(model):
    """Make every decoder layer use ``block_causal_mask`` of its position ids (eager)."""
    cache = _MaskCache()
    for layer in decoder_layers(model):
        eager = layer.forward

        def forward(hidden_states, attention_mask=None, position_ids=None, _eager=eager, **kw):
            if position_ids is not None:
                attention_mask = cache(position_ids)
            return _eager(hidden_states, attention_mask=attention_mask, position_ids=position_ids, **kw)

        layer.forward = forward
    return model


def _layer_call_cls():
    import torch

    class LayerCall(torch.nn.Module):
        """Positional tensors in, tensor out: the form make_graphed_callables captures."""

        def __init__(self, layer, eager):
            super().__init__()
            self.layer = layer  # registered so its parameters (the LoRA weights) get gradients
            self.eager = eager

        def forward(self, hidden, mask, cos, sin):
            return self.eager(hidden, attention_mask=mask, position_embeddings=(cos, sin))

    return LayerCall


def _record_layer_inputs(model, capacity: int, dtype):
    """Run one eager step on a packed sample and note what each layer receives (dtype, requires_grad)."""
    import torch

    layers = decoder_layers(model)
    seen: dict[int, tuple] = {}
    hooks = []
    for i, layer in enumerate(layers):
        def pre(mod, args, kwargs, i=i):
            h = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            seen[i] = (h.dtype, h.requires_grad, cos.dtype)
        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    device = next(p for p in layers[0].parameters()).device
    half = capacity // 2
    pos = torch.cat([torch.arange(half), torch.arange(capacity - half)])[None].to(device)
    ids = torch.randint(3, 100, (1, capacity), device=device)
    try:
        with torch.autocast("cuda", dtype=dtype):
            out = model(input_ids=ids, position_ids=pos, labels=ids)
        out.loss.backward()
    finally:
        for h in hooks:
            h.remove()
    model.zero_grad(set_to_none=True)
    return seen, pos


def graph_layers(model, capacity: int, dtype):
    """Capture every decoder layer of ``model`` as CUDA graphs for [1, capacity] packed micro-batches."""
    import torch

    layers = decoder_layers(model)
    if any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        raise ValueError("CUDA graphs cannot capture checkpointed layers; turn gradient checkpointing off.")
    was_training = model.training
    model.train()
    seen, pos = _record_layer_inputs(model, capacity, dtype)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    hidden = cfg.hidden_size
    cache = _MaskCache()
    mask = block_causal_mask(pos)
    LayerCall = _layer_call_cls()
    calls, samples = [], []
    for i, layer in enumerate(layers):
        h_dtype, h_grad, c_dtype = seen[i]
        calls.append(LayerCall(layer, layer.forward))
        h = torch.randn(1, capacity, hidden, device=pos.device, dtype=h_dtype).requires_grad_(h_grad)
        cos, sin = base.model.rotary_emb(h, pos)
        samples.append((h, mask, cos.to(c_dtype), sin.to(c_dtype)))
    # cache_enabled=False: autocast's weight-cast cache would keep tensors alive outside the graphs' pool.
    with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(tuple(calls), tuple(samples), num_warmup_iters=3)
    model.zero_grad(set_to_none=True)
    shape = (1, capacity, hidden)
    for layer, call in zip(layers, graphed):
        eager = call.eager

        def forward(hidden_states, attention_mask=None, position_ids=None, position_embeddings=None,
                    _eager=eager, _call=call, _layer=layer, **kw):
            if (_layer.training and torch.is_grad_enabled() and tuple(hidden_states.shape) == shape
                    and position_ids is not None and position_embeddings is not None):
                cos, sin = position_embeddings
                return _call(hidden_states, cache(position_ids), cos, sin)
            return _eager(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                          position_embeddings=position_embeddings, **kw)

        layer.forward = forward
    model.train(was_training)
    return len(layers)
