"""The "Run" dropdown that the Playground, Evaluate and Export tabs share: runs filtered by what
the tab needs (a final adapter, or any checkpoint), newest first, keeping the current choice.  A run folder
that cannot be read is left out of the list, never the reason the tab fails to load."""

from __future__ import annotations

from typing import Callable

import gradio as gr

from studio.runs import Run, RunStore


def has_adapter(run: Run) -> bool:
    return run.has_adapter()


def has_weights(run: Run) -> bool:
    return has_adapter(run) or bool(run.checkpoints())


def run_choices(store: RunStore, keep: Callable[[Run], bool] = has_adapter) -> list[tuple[str, str]]:
    out = []
    for r in store.list():
        try:
            if keep(r):
                out.append((f"{r.id} · {r.status}" + (" · ⚠️" if r.warnings() else ""), r.id))
        except Exception:  # noqa: BLE001 - one unreadable folder must not empty the list
            continue
    return out


def refresh_runs(store: RunStore, current: str | None, keep: Callable[[Run], bool] = has_adapter):
    choices = run_choices(store, keep)
    ids = [v for _, v in choices]
    return gr.Dropdown(choices=choices, value=current if current in ids else (ids[0] if ids else None))


def picker(store: RunStore, prefix: str, info: str, keep: Callable[[Run], bool] = has_adapter):
    """The Run dropdown with its refresh button beside it; returns (dropdown, button, first run id)."""
    choices = run_choices(store, keep)
    first = choices[0][1] if choices else None
    with gr.Row(equal_height=True):  # the refresh button right beside the list it refreshes
        # Custom values: a run that finished after the page loaded can still be named (ids are checked).
        run = gr.Dropdown(choices=choices, value=first, label="Run", info=info, allow_custom_value=True,
                          elem_id=f"{prefix}-run", scale=3)
        refresh = gr.Button("↻ Refresh", elem_id=f"{prefix}-refresh", scale=0, min_width=110)
    return run, refresh, first
