"""Greedy sample answers, one CUDA graph replay a token.

The answers a run writes at each evaluation (``sample`` events) decode a few prompts together.  Eagerly, a token of
Mistral-7B costs ~40 ms of Python (32 layers of small kernels, LoRA's extra matmuls) while the GPU works ~7 ms:
the fast preset's samples took 18 s of its 190 s job.  Here the prompts are prefilled eagerly into transformers'
``StaticLayer`` key/value buffers (fixed size, their fill level a GPU tensor: ``static_cache``), one decoding step
(a token per row, argmax, end-of-answer bookkeeping) is captured as a CUDA graph, and every further token is one
replay.

Contract: ``greedy_tokens(model, input_ids, attention_mask, max_new_tokens, eos_ids, pad_id, graphed)`` returns
the new tokens, [rows, steps], as ``model.generate(do_sample=False, cache_implementation="static")`` returns them
after the (left-padded) prompt: a row that ended is padded with ``pad_id``, and decoding stops once every row has
ended (checked every ``CHECK_EVERY`` tokens; columns past the end are dropped, so the result is the same).
``graphed=False`` runs the same steps eagerly (the CPU tests compare that with ``generate``); ``graphed=True`` needs
the model on a CUDA GPU.  ``Unsupported`` is raised before anything runs where a replayed step would go wrong
(``static_cache`` says which models): the caller then uses ``generate``.
"""

from __future__ import annotations

CHECK_EVERY = 16  # tokens between host checks of "every row ended" (each check waits for the GPU)


class Unsupported(ValueError):
    """A replayed decoding step would not follow this model: its cache would roll or resize, or its attention or
    RoPE decides something on the host."""


def _rope_types(config) -> set[str]:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return {"default"}
    per_layer = [v for v in rope.values() if isinstance(v, dict)]  # Gemma 3: one entry per layer type
    return {str(r.get("rope_type", r.get("type", "default"))) for r in (per_layer or [rope])}


def static_cache(config, length: int):
    """Full-attention static layers for ``length`` positions, or ``Unsupported``.

    transformers' sliding-window static layer counts its fill level in a Python int, which the model reads as the
    queries' offset: a replayed graph would keep the offset it was captured with.  A window (or attention chunk) of
    at least ``length`` positions restricts nothing, so its layers get the full-attention layer, whose fill level
    is a GPU tensor; a shorter window would roll the cache and is refused.  Refused too: attention other than
    SDPA or eager (flash-attention's mask drops the causal offset the open future slots rely on), and dynamic or
    long RoPE (their frequencies are chosen in Python from the sequence length, a host sync inside the capture).
    """
    from transformers.cache_utils import Cache, StaticLayer, get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True)
    attn = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)
    if attn not in ("sdpa", "eager"):
        raise Unsupported(f"{attn} attention: graphed decoding runs with sdpa or eager attention")
    rope = sorted(t for t in _rope_types(text) if t.startswith("dynamic") or t == "longrope")
    if rope:
        raise Unsupported(f"{rope[0]} RoPE picks its frequencies from the length on the host")
    types, kwargs = get_layer_types_and_kwargs(text)
    window = kwargs.get("sliding_window")
    if any(t not in ("full_attention", "sliding_attention", "chunked_attention") for t in types):
        raise Unsupported(f"layer types {sorted(set(types))} have no fixed-size cache")
    if window is not None and window < length:
        raise Unsupported(f"a {window}-token attention window is shorter than prompt plus answer ({length})")
    return Cache(layers=[StaticLayer(max_cache_len=length) for _ in types])


def greedy_tokens(model, input_ids, attention_mask, max_new_tokens: int, eos_ids, pad_id: int,
                  graphed: bool = False):
    import torch

    rows, n = input_ids.shape
    length = n + max_new_tokens
    cache = static_cache(model.config, length)
    dev = input_ids.device
    # Padding stays masked; every later slot is open (causality hides slots not written yet).
    mask = torch.ones(rows, length, dtype=torch.bool, device=dev)
    mask[:, :n] = attention_mask.bool()
    pos = attention_mask.long().cumsum(-1) - 1
    pos.masked_fill_(attention_mask == 0, 0)  # as generate; a pad position is never attended
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=dev)
    done = torch.zeros(rows, dtype=torch.bool, device=dev)

    def pick(logits):
        nxt = logits[:, -1, :].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        done.logical_or_(torch.isin(nxt, eos))
        return nxt

    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        tok = pick(out.logits)[:, None].clone()
        at = pos[:, -1:] + 1

        def step():
            o = model(input_ids=tok, attention_mask=mask, position_ids=at, past_key_values=cache, use_cache=True,
                      logits_to_keep=1)
            tok.copy_(pick(o.logits)[:, None])
            at.add_(1)

        tokens = [tok.clone()]
        run = step
        left = max_new_tokens - 1
        if graphed and left > 1:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            # The outer stream context puts this thread back on its stream even when a failed capture makes
            # torch.cuda.graph's own exit raise before it restores the stream.
            with torch.cuda.stream(side):
                step()  # the warm-up outside the capture (torch's rule); it is the second token
                # The training data loader's pin-memory thread stays alive through an evaluation: only this
                # thread's calls are checked for capture safety (the other's work is never captured).
                with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            tokens.append(tok.clone())
            left -= 1
            run = graph.replay
        for _ in range(left):
            if len(tokens) % CHECK_EVERY == 0 and bool(done.all()):
                break
            run()
            tokens.append(tok.clone())
    new = torch.cat(tokens, dim=1)
    # generate stops after the step in which the last row ended: drop the columns past it.
    hit = torch.isin(new, eos)
    if bool(hit.any(dim=1).all()):
        new = new[:, : int(hit.int().argmax(dim=1).max()) + 1]
    return new
