"""The "Run" dropdown that the Playground, Evaluate and Export tabs share: runs filtered by what
the tab needs (a final adapter, or any checkpoint), newest first, keeping the current choice."""

from __future__ import annotations

from typing import Callable

import gradio as gr

from studio.runs import Run, RunStore


def has_adapter(run: Run) -> bool:
    return (run.adapter_dir / "adapter_model.safetensors").exists()


def has_weights(run: Run) -> bool:
    return has_adapter(run) or bool(run.checkpoints())


def run_choices(store: RunStore, keep: Callable[[Run], bool] = has_adapter) -> list[tuple[str, str]]:
    return [(f"{r.id} · {r.status}", r.id) for r in store.list() if keep(r)]


def refresh_runs(store: RunStore, current: str | None, keep: Callable[[Run], bool] = has_adapter):
    choices = run_choices(store, keep)
    ids = [v for _, v in choices]
    return gr.Dropdown(choices=choices, value=current if current in ids else (ids[0] if ids else None))
