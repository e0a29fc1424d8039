"""Typed widgets built from ``RunConfig`` field metadata, and the one mapping from widget values to a config.

Contract: ``widget(key, value)`` returns a bounded Slider/Number, a Dropdown for choices, a Checkbox
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


def widget(key: str, value, label: str | None = None, **kw):
    f: dataclasses.Field = field_specs()[key]
    typ = field_type(key)
    meta = f.metadata
    label = label or key.split(".")[-1].replace("_", " ")
    info = meta.get("help")
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
        return gr.Number(value=value, minimum=lo, maximum=hi, label=label, info=info,
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
