"""Typed widgets built from ``RunConfig`` field metadata, and the one mapping from widget values to a config.

Contract: ``widget(key, value)`` returns a bounded Slider or a Number (its range in the help text, checked by
``RunConfig`` rather than by Gradio, so any typing sequence is accepted), a Dropdown for choices, a Checkbox
for booleans or a Textbox for strings (lists as comma-separated text), labelled with the field name
and its help text.  ``to_config(base, keys, values)`` applies the values by dotted key onto ``base``
and validates: errors come back as ``ConfigError`` naming the key, for the caller to show.
"""

from __future__ import annotations

import dataclasses
import typing

import gradio as gr

from studio.config import RunConfig, field_specs, field_type

LOG_SLIDERS = {"train.learning_rate"}  # shown as a number box: a log-scale quantity on a linear slider is unusable


def get_value(cfg: RunConfig, key: str):
    cur = cfg
    for p in key.split("."):
        cur = getattr(cur, p)
    return cur


def short_help(text: str | None, limit: int = 110) -> str | None:
    """The help's first sentence (long explanations live in docs/ and the config's own help)."""
    if not text:
        return text
    first = text.split(". ")[0].rstrip(".") + "."
    return first if len(first) <= limit else first[:limit - 1].rsplit(" ", 1)[0] + "…"


def bounded_info(info: str | None, lo, hi) -> str | None:
    """Help text with the allowed range, since the number box itself does not refuse keystrokes."""
    if lo is None and hi is None:
        return info
    def num(v):
        return f"{v:,}" if isinstance(v, int) else f"{v:g}"

    rng = f"{num(lo)} to {num(hi)}" if lo is not None and hi is not None else (
        f"at least {num(lo)}" if lo is not None else f"at most {num(hi)}")
    return f"{info} ({rng})" if info else rng


def widget(key: str, value, label: str | None = None, **kw):
    f: dataclasses.Field = field_specs()[key]
    typ = field_type(key)
    meta = f.metadata
    label = label or key.split(".")[-1].replace("_", " ")
    info = short_help(meta.get("help"))
    if "choices" in meta:
        return gr.Dropdown(choices=list(meta["choices"]), value=value, label=label, info=info, **kw)
    if typ is bool:
        return gr.Checkbox(value=value, label=label, info=info, **kw)
    if typ in (int, float):
        lo, hi = meta.get("min"), meta.get("max")
        if key not in LOG_SLIDERS and hi is not None and lo is not None and hi - lo <= 4096 and typ is int:
            return gr.Slider(minimum=lo, maximum=hi, step=1, value=value, label=label, info=info, **kw)
        if key not in LOG_SLIDERS and typ is float and hi is not None and hi <= 1.0:
            return gr.Slider(minimum=lo, maximum=hi, step=0.01, value=value, label=label, info=info, **kw)
        # No minimum/maximum on the Number itself: Gradio would raise on every keystroke's partial value
        # (typing 48 sends 4 first, 0.003 sends 0) and paint the panels fed by it as errors.  The bounds are
        # in the help text and RunConfig checks the final value, naming the key in a visible message.
        return gr.Number(value=value, label=label, info=bounded_info(info, lo, hi),
                         precision=0 if typ is int else None, **kw)
    if typing.get_origin(typ) is list:
        return gr.Textbox(value=", ".join(value or []), label=label, info=info, **kw)
    return gr.Textbox(value=value, label=label, info=info, **kw)


def to_config(base: RunConfig, keys: list[str], values: list) -> RunConfig:
    overrides = {}
    for k, v in zip(keys, values):
        if field_type(k) is int and isinstance(v, float) and v.is_integer():
            v = int(v)
        overrides[k] = v
    return base.replace(overrides)


def named(fn, names: list[str], defaults: list | None = None):
    """``fn`` with a signature naming its parameters, so the API page and gradio_client show config keys instead
    of ``param_N``: a dotted key is named with ``__`` for its dot (``train.max_steps`` -> ``train__max_steps``, a
    Python name); with ``defaults`` (the inputs' values) an API call may name only the fields it changes."""
    import inspect

    def call(*args):
        return fn(*args)

    empty = inspect.Parameter.empty
    call.__signature__ = inspect.Signature(
        [inspect.Parameter(n.replace(".", "__"), inspect.Parameter.POSITIONAL_OR_KEYWORD,
                           default=empty if defaults is None else d)
         for n, d in zip(names, defaults if defaults is not None else names)])
    call.__name__ = fn.__name__
    return call
