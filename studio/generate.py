"""Text generation with the training template: base, adapter, or a toggle between them.

Contract:
- ``generate_text`` / ``stream`` format the user's text with ``templates.render_prompt`` (the same
  function training used), generate, and return (or yield, growing) only the new text, cut at EOS
  or the template's end marker.
- ``adapter=None`` runs the base weights (peft's ``disable_adapter``), a name runs that adapter;
  one loaded base model serves both, so base and tuned answers come from the same weights.
- ``seed`` makes sampling repeatable so base and tuned answers can be compared fairly.
- ``render_conversation(history, text, spec, tokenizer)`` renders a whole conversation (earlier user and
  assistant messages, then the new user text) as one prompt: the model's chat template for ``chat``, else
  each earlier turn exactly as training renders an example (prompt, answer, the template's end: ``### End``
  for qa, the EOS token otherwise) followed by the new turn's prompt.  ``stream(..., prompt=...)`` generates
  from such a rendered prompt.
"""

from __future__ import annotations

import contextlib
import re
import threading
from dataclasses import dataclass
from typing import Iterator

from studio.data.schema import Example
from studio.data.templates import TemplateSpec, render, render_prompt, stop_strings
from studio.data.tokenize import encode_prompt


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0


def _pairs(history: list[dict]) -> list[tuple[str, str]]:
    """(user, assistant) pairs of a messages list; a user message without an answer yet is dropped."""
    pairs, user = [], None
    for m in history or []:
        role, content = m.get("role"), m.get("content")
        content = content if isinstance(content, str) else str(content or "")
        if role == "user":
            user = content
        elif role == "assistant" and user is not None:
            pairs.append((user, content))
            user = None
    return pairs


def render_conversation(history: list[dict], text: str, spec: TemplateSpec, tokenizer=None) -> str:
    """The prompt for ``text`` after the earlier turns of ``history`` (role/content messages)."""
    from studio.data.templates import _apply_chat

    pairs = _pairs(history)
    if spec.name == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            return render_prompt(text, spec, tokenizer)  # raises the template's own sentence
        msgs = [m for u, a in pairs for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
        return _apply_chat(tokenizer, msgs + [{"role": "user", "content": text}], add_generation_prompt=True)
    eos = getattr(tokenizer, "eos_token", None) or ""
    out = []
    for u, a in pairs:
        prompt, response = render(Example(instruction=u, response=a), spec, tokenizer)
        # Training ends every example with EOS (qa's "### End" also ends the text); earlier turns do the same.
        out.append(prompt + response + ("" if spec.name == "qa" else eos) + "\n\n")
    return "".join(out) + render_prompt(text, spec, tokenizer)


def _adapter_ctx(model, adapter: str | None):
    if not hasattr(model, "disable_adapter"):
        return contextlib.nullcontext()
    if adapter is None:
        return model.disable_adapter()
    model.set_adapter(adapter)
    return contextlib.nullcontext()


def _gen_kwargs(tokenizer, s: Sampling) -> dict:
    kw = dict(max_new_tokens=s.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
              eos_token_id=tokenizer.eos_token_id, repetition_penalty=s.repetition_penalty, use_cache=True)
    if s.temperature > 0:
        kw.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _cut(text: str, spec: TemplateSpec) -> str:
    # Byte-fallback tokens can decode to control characters that a browser shows as boxes.
    text = _CONTROL.sub("", text)
    for s in stop_strings(spec):
        i = text.find(s)
        if i >= 0:
            return text[:i]
    return text


def _inputs(model, tokenizer, prompt: str):
    import torch

    # The ids training sequences of this template begin with (a trailing space belongs to the answer's token).
    ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=next(model.parameters()).device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def generate_text(model, tokenizer, text: str, spec: TemplateSpec, *, input: str = "", system: str = "",
                  adapter: str | None = "__current__", sampling: Sampling | None = None,
                  max_new_tokens: int | None = None) -> str:
    import torch

    s = sampling or Sampling()
    if max_new_tokens:
        s = Sampling(max_new_tokens, s.temperature, s.top_p, s.repetition_penalty, s.seed)
    prompt = render_prompt(text, spec, tokenizer, system=system, input=input)
    enc = _inputs(model, tokenizer, prompt)
    ctx = contextlib.nullcontext() if adapter == "__current__" else _adapter_ctx(model, adapter)
    torch.manual_seed(s.seed)
    with ctx, torch.no_grad():
        out = model.generate(**enc, **_gen_kwargs(tokenizer, s))
    new = out[0, enc["input_ids"].shape[1]:]
    return _cut(tokenizer.decode(new, skip_special_tokens=True), spec).strip()


def generate_texts(model, tokenizer, examples: list, spec: TemplateSpec, max_new_tokens: int,
                   graphed: bool = False) -> list[str]:
    """Greedy answers to several examples (``instruction``, ``input``, ``system``) in one batched ``generate``: the
    prompts left-padded with an attention mask, so each row decodes what it would alone; the run's evaluation
    samples use it (one decode loop instead of one per prompt).  ``graphed`` (a CUDA model): each token is one
    CUDA graph replay (``studio.speed.graph_decode``), where the model's cache allows it."""
    import torch

    if not examples:
        return []
    ids = [encode_prompt(tokenizer, render_prompt(ex.instruction, spec, tokenizer, system=ex.system, input=ex.input))
           for ex in examples]
    n = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (n - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in ids], device=device)
    new = None
    if graphed and device.type == "cuda":
        from studio.speed.graph_decode import Unsupported, greedy_tokens

        eos = tokenizer.eos_token_id
        with contextlib.suppress(Unsupported):  # a cache that rolls or resizes: generate below
            new = greedy_tokens(model, input_ids, mask, max_new_tokens, eos if isinstance(eos, list) else [eos],
                                tokenizer.pad_token_id, graphed=True)
    if new is None:
        with torch.no_grad():
            new = model.generate(input_ids=input_ids, attention_mask=mask,
                                 **_gen_kwargs(tokenizer, Sampling(max_new_tokens=max_new_tokens)))[:, n:]
    return [_cut(tokenizer.decode(row, skip_special_tokens=True), spec).strip() for row in new]


def stream(model, tokenizer, text: str, spec: TemplateSpec, *, adapter: str | None = None,
           sampling: Sampling | None = None, input: str = "", system: str = "",
           lock: threading.Lock | None = None, prompt: str | None = None) -> Iterator[str]:
    """Yield the growing answer.  ``lock`` serialises generations that share one model (adapter toggling);
    ``prompt``, an already rendered prompt (``render_conversation``), replaces ``text``'s rendering."""
    import torch
    from transformers import TextIteratorStreamer

    s = sampling or Sampling()
    if prompt is None:
        prompt = render_prompt(text, spec, tokenizer, system=system, input=input)
    enc = _inputs(model, tokenizer, prompt)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    error: list[BaseException] = []

    def work():
        try:
            with (lock or contextlib.nullcontext()), _adapter_ctx(model, adapter), torch.no_grad():
                torch.manual_seed(s.seed)
                model.generate(**enc, streamer=streamer, **_gen_kwargs(tokenizer, s))
        except BaseException as e:  # noqa: BLE001 - surfaced to the caller below
            error.append(e)
            streamer.end()

    th = threading.Thread(target=work, daemon=True)
    th.start()
    text_so_far = ""
    for piece in streamer:
        text_so_far += piece
        cut = _cut(text_so_far, spec)
        yield cut.strip()
        if cut != text_so_far:
            break
    th.join(timeout=1)
    if error:
        raise error[0]
