"""The Train tab: start, stop and resume runs and watch them live, from the run folders only.

Contract:
- ``build(ctx, data_ui, presets_ui) -> TrainUI`` lays the tab out inside an open ``gr.Blocks``.  Start
  builds the config with ``widgets.to_config`` from the chosen preset (``presets_ui.base``) and the
  values of ``presets_ui.inputs + data_ui.inputs``, then hands it to ``studio.worker``; the run trains
  in a worker process, so closing the browser does not stop it.  Start builds the config with
  ``config_for`` and refuses what ``check_data`` and ``check_machine`` refuse; the summary above Start
  (``TrainUI.summary``, drawn by ``studio.ui.state``) is computed from the same function and checks.
- Everything shown is drawn from the run folder (events through ``ctx.follower``, the worker log), so a
  reload, a second browser or an app restart shows the same run with its full history.  On page load
  the active run is selected, else the most recent one; a run that appeared since the last tick is shown
  even when it already ended; a ``gr.Timer`` tick refreshes the view, follows
  a run started elsewhere and raises one toast per run ending (completed, stopped, failed, halted,
  interrupted) per browser session.
- The preference stage (DPO, ORPO, KTO on a finished run's votes) has its own folded section
  (``studio.ui.stage``); the run it starts is shown here like any run, its chart drawn by ``prefer_figure``
  (loss, reward margin, reward accuracy, chosen/rejected log-probs) and its status by ``stage_text``.
- Figures and texts come from plain functions of an events list (``loss_figure``, ``memory_figure``,
  ``progress_text``, ``status_text``, ``sample_rows``) or of the store (``history_rows``,
  ``compare_figure``), testable without a browser.
- API endpoints: ``start`` (run id shown, message: the new run's id, or the unchanged one when nothing
  started), ``stop`` (message), ``resume`` (run id -> message), ``status`` (run id -> dict) and ``prefer``
  (the stage section's values -> the stage's run id, message).
  Engine errors come back as messages, never tracebacks.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from studio import worker
from studio.config import ConfigError, RunConfig
from studio.data.files import DataError, check_size
from studio.runs import LIVE, TERMINAL, Run, RunStore, status_of
from studio.security import SecurityError, check_output_free, local_dataset, local_model, output_dir, redact
from studio.ui.data import check_before_start, check_data_path
from studio.ui import stage
from studio.ui.messages import message
from studio.ui.stage import StageUI
from studio.ui.widgets import named, to_config

SAMPLE_HEADERS = ["step", "prompt", "reference", "answer"]
HISTORY_HEADERS = ["run", "status", "preset", "step", "train loss", "eval loss"]
LOG_LINES = 12
# A cooperative stop lets the worker finish its step and write a checkpoint; a 7B step plus a
# checkpoint save can take a minute on a busy GPU, so wait this long before ending the process group.
STOP_GRACE = 120.0
GIB = 2**30
# Gradio draws the plot's label as a badge over the top-left corner: the legend goes above the plot,
# right-aligned, in a top margin tall enough to clear it.
TOP_MARGIN = 60
LEGEND = dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1)
HISTORY_EVERY_S = 5.0  # while a run trains, the history table (a summary of every run) is redrawn this often


@dataclass
class TrainUI:
    run_name: gr.Textbox
    start: gr.Button
    stop: gr.Button
    resume: gr.Button
    message: gr.Markdown
    run: gr.Dropdown
    status: gr.Markdown
    progress: gr.HTML
    loss_plot: gr.Plot
    memory_plot: gr.Plot
    samples: gr.Dataframe
    log: gr.Textbox
    history: gr.Dataframe
    compare: gr.Dropdown
    compare_plot: gr.Plot
    timer: gr.Timer
    session: gr.State
    summary: gr.Markdown | None = None  # what Start would train on (drawn by ``studio.ui.state``)
    stage: StageUI | None = None  # the preference stage's section (``studio.ui.stage``)


# ---- plain functions of events ------------------------------------------------------------------

def _num(v) -> float | None:
    """A finite float, or None (NaN/inf arrive as strings from the events file)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _series(events: list[dict], type_: str, field: str) -> tuple[list[int], list[float]]:
    # Last value per step: a resumed run logs again the steps after its checkpoint.
    by_step: dict[int, float] = {}
    for e in events:
        if e.get("type") == type_ and "step" in e:
            v = _num(e.get(field))
            if v is not None:
                by_step[int(e["step"])] = v
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _last(events: list[dict], type_: str, **match) -> dict | None:
    for e in reversed(events):
        if e.get("type") == type_ and all(e.get(k) == v for k, v in match.items()):
            return e
    return None


def _empty_figure(text: str, height: int = 320) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(height=height, xaxis_visible=False, yaxis_visible=False, margin=dict(l=10, r=10, t=30, b=10),
                      plot_bgcolor="rgba(0,0,0,0)")
    return fig


PREFER_FIELDS = ("reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected")


def is_stage(events: list[dict]) -> bool:
    """A preference stage's events: its starting status names the parent run, its metrics carry rewards."""
    return any((e.get("type") == "status" and e.get("parent_run"))
               or (e.get("type") == "metric" and any(k in e for k in PREFER_FIELDS)) for e in events)


def prefer_figure(events: list[dict]) -> go.Figure:
    """A preference stage: loss, reward margin and (right axis) reward accuracy above; the log-probabilities of
    the chosen and rejected answers below (the margin grows as they part)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, row_heights=[0.58, 0.42],
                        specs=[[{"secondary_y": True}], [{}]])
    lines = [("metric", "loss", "training loss", "#1f77b4", 1, False, "lines+markers"),
             ("eval", "eval_loss", "validation loss", "#1f77b4", 1, False, "markers"),
             ("metric", "reward_margin", "reward margin", "#9467bd", 1, False, "lines+markers"),
             ("eval", "reward_margin", "validation reward margin", "#9467bd", 1, False, "markers"),
             ("metric", "reward_accuracy", "reward accuracy", "#ff7f0e", 1, True, "lines+markers"),
             ("eval", "reward_accuracy", "validation reward accuracy", "#ff7f0e", 1, True, "markers"),
             ("metric", "logps_chosen", "log-prob chosen", "#2a9d8f", 2, False, "lines+markers"),
             ("metric", "logps_rejected", "log-prob rejected", "#e63946", 2, False, "lines+markers")]
    for type_, field, name, color, row, right, mode in lines:
        s, v = _series(events, type_, field)
        if type_ == "eval" and not s:
            continue  # no held-out pairs: no validation traces in the legend
        fig.add_trace(go.Scatter(x=s, y=v, name=name, mode=mode, marker_size=7 if type_ == "eval" else 4,
                                 line=dict(color=color, dash="dot" if right else None)),
                      row=row, col=1, secondary_y=right if row == 1 else None)
    fig.update_yaxes(title_text="loss · margin", row=1, col=1, secondary_y=False)
    fig.update_yaxes(title_text="accuracy", range=[-0.05, 1.05], showgrid=False, row=1, col=1, secondary_y=True)
    fig.update_yaxes(title_text="log-prob", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    fig.update_layout(height=460, margin=dict(l=10, r=10, t=TOP_MARGIN + 20, b=10), legend=LEGEND,
                      hovermode="x unified", uirevision="prefer")
    return fig


def loss_figure(events: list[dict]) -> go.Figure:
    """Training loss, validation loss and (right axis) learning rate against the step; a preference stage's
    rewards and log-probabilities (``prefer_figure``) for a stage run."""
    if is_stage(events):
        return prefer_figure(events)
    fig = go.Figure()
    s, v = _series(events, "metric", "loss")
    fig.add_trace(go.Scatter(x=s, y=v, name="training loss", mode="lines+markers", marker_size=4))
    s, v = _series(events, "eval", "eval_loss")
    fig.add_trace(go.Scatter(x=s, y=v, name="validation loss", mode="lines+markers", marker_size=7))
    s, v = _series(events, "metric", "learning_rate")
    fig.add_trace(go.Scatter(x=s, y=v, name="learning rate", mode="lines", yaxis="y2",
                             line=dict(dash="dot", width=1.5)))
    fig.update_layout(
        height=360, margin=dict(l=10, r=10, t=TOP_MARGIN, b=10), xaxis_title="step", yaxis_title="loss",
        yaxis2=dict(title="learning rate", overlaying="y", side="right", showgrid=False, exponentformat="e"),
        legend=LEGEND, hovermode="x unified",
        uirevision="loss")  # keeps the user's zoom across the once-a-second updates
    return fig


def memory_figure(events: list[dict]) -> go.Figure:
    """A gauge of memory used / total at the last metric, with the run's peak as a red mark.

    GPU memory when the worker trains on CUDA, else system RAM with the worker's peak RSS.  When the
    metric carries several GPUs (``memory.gpus``, a run spread over them), one bar per GPU instead.
    """
    mems = [e["memory"] for e in events if e.get("type") == "metric" and isinstance(e.get("memory"), dict)]
    if not mems:
        return _empty_figure("memory: waiting for the first step", height=300)
    last = mems[-1]
    on_gpu = last.get("device") == "cuda"
    peak = max((m.get("peak" if on_gpu else "rss") or 0) for m in mems) / GIB
    gpus = [g for g in last.get("gpus") or [] if isinstance(g, dict)]
    if on_gpu and len(gpus) > 1:
        return _gpu_bars(gpus, peak)
    used, total = (last.get("used") or 0) / GIB, (last.get("total") or 0) / GIB
    what = "GPU memory in use" if on_gpu else "system RAM in use (no GPU)"
    peak_what = "run peak allocated" if on_gpu else "training worker peak"
    fig = go.Figure(go.Indicator(
        mode="gauge+number", value=round(used, 2),
        number=dict(suffix=f" / {total:.1f} GiB", valueformat=".2f", font_size=40),
        title=dict(text=f"{what}<br><span style='font-size:0.8em'>{peak_what} {peak:.2f} GiB</span>", font_size=18),
        gauge=dict(axis=dict(range=[0, max(total, 1e-3)]), bar=dict(color="#2a9d8f"),
                   threshold=dict(line=dict(color="#e63946", width=4), thickness=0.8, value=peak))))
    fig.update_layout(height=300, margin=dict(l=25, r=25, t=70, b=10))
    return fig


def _gpu_bars(gpus: list[dict], peak: float) -> go.Figure:
    """One horizontal bar per GPU: used of total GiB, the total drawn as a pale track behind it."""
    names = [f"GPU {g.get('index', i)}" for i, g in enumerate(gpus)]
    used = [(g.get("used") or 0) / GIB for g in gpus]
    total = [(g.get("total") or 0) / GIB for g in gpus]
    fig = go.Figure([
        go.Bar(y=names, x=total, orientation="h", marker_color="#e5e7eb", hoverinfo="skip", showlegend=False),
        go.Bar(y=names, x=used, orientation="h", marker_color="#2a9d8f", showlegend=False,
               text=[f"{u:.1f} / {t:.0f} GiB" for u, t in zip(used, total)], textposition="outside",
               hovertemplate="%{y}: %{x:.2f} GiB<extra></extra>")])
    fig.update_layout(
        barmode="overlay", height=300, margin=dict(l=10, r=10, t=70, b=10), plot_bgcolor="rgba(0,0,0,0)",
        title=dict(text=f"GPU memory in use, per GPU<br><span style='font-size:0.8em'>run peak allocated "
                        f"{peak:.2f} GiB (rank 0)</span>", x=0.5, font_size=18),
        xaxis=dict(title="GiB", range=[0, max(total + [1e-3]) * 1.25]), yaxis=dict(autorange="reversed"))
    return fig


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_text(events: list[dict], status: str, now: float | None = None) -> str:
    """HTML progress bar and one line: step/max_steps, epoch, elapsed, ETA, average tokens/s."""
    now = time.time() if now is None else now
    # A run trains in segments (one per start or resume); each begins with a "running" status event.
    segments: list[dict] = []
    for e in events:
        if e.get("type") == "status" and e.get("status") == "running":
            segments.append({"start": e, "last": None})
        elif e.get("type") == "metric" and segments:
            segments[-1]["last"] = e
    if not segments:
        return f"<div class='train-progress'><progress value='0' max='1' style='width:100%'></progress>" \
               f"<div>{html.escape(status)}: waiting for the first training step</div></div>"
    seg = segments[-1]
    m, start = seg["last"], seg["start"]
    first = int(start.get("step") or 0)  # the checkpoint step a resumed segment starts from
    max_steps = int((m or start).get("max_steps") or 0)
    step = int(m["step"]) if m else first
    if status in TERMINAL:
        # Metrics come every logging_steps; the final status names the step training really ended at.
        final = _last(events, "status", status=status) or {}
        step = int(final.get("step") or (max_steps if status == "completed" else step))
        max_steps = max(max_steps, step)
    live = status in LIVE
    # Earlier segments count in full; the current one up to now while it is live.
    done = sum((s["last"] or {}).get("elapsed", 0) or 0 for s in segments[:-1])
    current = now - start["t"] if live else ((m or {}).get("elapsed") or 0)
    eta = None
    if m and int(m["step"]) > first and m.get("elapsed"):
        per_step = m["elapsed"] / (int(m["step"]) - first)
        eta = per_step * max(max_steps - step, 0) if live else (0 if status == "completed" else None)
    tps = average_tokens_per_s(segments)
    epoch = _num((m or {}).get("epoch"))
    pct = 100 * step / max_steps if max_steps else 0
    parts = [f"step {step} / {max_steps} ({pct:.0f}%)",
             f"epoch {epoch:.2f}" if epoch is not None else "epoch —",
             f"elapsed {_clock(done + current)}",
             f"ETA {_clock(eta)}",
             f"{tps:,.0f} tokens/s average" if tps is not None else "— tokens/s"]
    return (f"<div class='train-progress'><progress value='{step}' max='{max(max_steps, 1)}' style='width:100%'>"
            f"</progress><div>{' · '.join(parts)} · <b>{html.escape(status)}</b></div></div>")


def average_tokens_per_s(segments: list[dict]) -> float | None:
    """Tokens seen over the training time of every segment, up to the last metric: steadier than one
    logging interval, which swings with example lengths and evaluation pauses."""
    last = next((s["last"] for s in reversed(segments) if s["last"]), None)
    seconds = sum(_num((s["last"] or {}).get("elapsed")) or 0 for s in segments)
    seen = _num((last or {}).get("tokens_seen"))
    if not seen or seconds <= 0:
        return _num((last or {}).get("tokens_per_s"))  # events written before tokens_seen existed
    return seen / seconds


def status_text(run_id: str, events: list[dict], status: str) -> str:
    """Markdown: the run, its status, the data it trains on and, at the end, the result or the reason."""
    lines = [f"**Run `{run_id}`: {status}**"]
    data = _last(events, "data")
    if data:
        lines.append(f"Data: {data.get('train', 0)} training and {data.get('validation', 0)} validation examples"
                     + (f", {data['skipped']} skipped" if data.get("skipped") else "") + ".")
    stage_line = stage_text(events)
    if stage_line:
        lines.append(stage_line)
    plan = _last(events, "plan")
    if plan:
        lines.append(plan_text(plan))
    lean = lean_text(_last(events, "fused_lora"), _last(events, "checkpoint_offload"), _last(events, "graphs"),
                     _last(events, "weight_cache"), _last(events, "flat_optimizer"))
    if lean:
        lines.append(lean)
    last = _last(events, "status") or {}
    if status in ("queued", "starting"):
        lines.append("Starting the worker: loading the model and the data…")
    elif status == "resuming":
        lines.append(f"Resuming from {last.get('checkpoint', 'the last checkpoint')}.")
    elif status == "completed":
        final = last.get("final") or {}
        lines.append(f"Completed at step {last.get('step', '?')}: training loss {_fmt(final.get('train_loss'))}, "
                     f"validation loss {_fmt(final.get('eval_loss'))}. The adapter is in the run folder's adapter/.")
    elif status == "stopped":
        ck = last.get("checkpoint")
        lines.append(f"Stopped at step {last.get('step', '?')}; "
                     + (f"resume continues from {ck}." if ck else "no checkpoint was saved, so it cannot resume."))
    elif status in ("failed", "halted"):
        lines.append(f"Reason: {last.get('message', 'unknown')}")
        if last.get("remedy"):
            lines.append(f"What to do: {last['remedy']}")
    elif status == "interrupted":
        lines.append("The worker ended without a final status (the app or the machine restarted, or the process "
                     "was killed). Resume continues from the last complete checkpoint.")
    return "\n\n".join(lines)


def stage_text(events: list[dict]) -> str:
    """For a preference stage: the method, the run and adapter it started from, the last rewards logged."""
    start = next((e for e in events if e.get("type") == "status" and e.get("parent_run")), None)
    if start is None:
        return ""
    adapter = str(start.get("adapter") or "")
    origin = f"checkpoint {adapter.rsplit('-', 1)[-1]}" if "checkpoint-" in adapter else "final adapter"
    text = (f"Preference stage: {str(start.get('method', '')).upper()} on run `{start['parent_run']}` from its "
            f"{origin}.")
    m = next((e for e in reversed(events) if e.get("type") == "metric" and _num(e.get("reward_margin")) is not None),
             None)
    if m:
        text += (f" Step {m.get('step')}: reward margin {_fmt(m['reward_margin'])}, reward accuracy "
                 f"{_fmt(m.get('reward_accuracy'))}.")
    return text


def plan_text(plan: dict) -> str:
    """How the run computes on its machine (the ``plan`` event of ``studio.speed``), with what fell back."""
    from studio.speed.plan import event_text

    return event_text(plan)


def lean_text(fused: dict | None, offload: dict | None, graphs: dict | None, cache: dict | None = None,
              flat: dict | None = None) -> str:
    """The speed parts that took effect: graphs captured, weight cache, offloaded checkpoints, fused LoRA, one
    optimizer update."""
    bits = []
    if graphs:
        what = "checkpointed layer stack as one CUDA graph" if graphs.get("checkpointed") else \
            f"CUDA graphs ({graphs.get('layers')} layers)"
        bits.append(what + (", its saved inputs in CPU RAM" if graphs.get("offload") else "")
                    + f" (captured in {graphs.get('seconds')} s)")
    if cache:
        bits.append(f"16-bit weight cache ({cache.get('gib')} GiB)")
    if offload:
        bits.append(f"checkpointed inputs of {offload.get('layers')} layers kept in CPU RAM")
        if offload.get("up_proj"):
            bits.append(f"MLP up-projections of {offload['up_proj']} layers kept in CPU RAM "
                        f"({offload.get('host_gib')} GiB), not recomputed")
        elif offload.get("up_proj_note"):
            bits.append(f"MLP up-projections recomputed: offload_up_proj {offload['up_proj_note']}")
    if fused:
        bits.append(f"fused 4-bit LoRA in {fused.get('layers')} layers")
    if flat:
        bits.append(f"one 8-bit optimizer update for {flat.get('tensors')} LoRA tensors")
    return ("In effect: " + "; ".join(bits) + ".") if bits else ""


def finish_notice(run_id: str, status: str, last: dict) -> tuple[str, str] | None:
    """(level, text) of the toast for a run that just ended, or None if it has not."""
    step = last.get("step", "?")
    if status == "completed":
        final = last.get("final") or {}
        return "info", (f"Run {run_id} completed at step {step}: training loss {_fmt(final.get('train_loss'))}, "
                        f"validation loss {_fmt(final.get('eval_loss'))}.")
    if status == "stopped":
        return "info", f"Run {run_id} stopped at step {step}."
    if status in ("failed", "halted"):
        text = f"Run {run_id} {status}: {last.get('message', 'unknown reason')}"
        return "warning", text + (f" What to do: {last['remedy']}" if last.get("remedy") else "")
    if status == "interrupted":
        return "warning", f"Run {run_id} was interrupted: its worker ended without a final status. Resume it."
    return None


def sample_rows(events: list[dict]) -> list[list]:
    """Answers to the fixed validation prompts, newest evaluation first."""
    rows = []
    for e in events:
        if e.get("type") == "sample":
            prompt = e.get("prompt", "")
            if e.get("input"):
                prompt = f"{prompt}\n\n{e['input']}"
            rows.append([e.get("step"), prompt, e.get("reference", ""), e.get("answer", "")])
    return sorted(rows, key=lambda r: -(r[0] or 0))  # stable: prompts keep their order within a step


def log_tail(run: Run, lines: int = LOG_LINES) -> str:
    """The last lines of the worker log, tokens redacted (again: the log may predate a token change)."""
    text = run.log_tail(64 * 1024)  # never blocks on a FIFO nor follows a link planted in the run folder
    return redact("\n".join(text.splitlines()[-lines:]))


def _fmt(v) -> str:
    f = _num(v)
    if f is None:
        return "—" if v is None else str(v)
    return f"{f:.4f}"


# ---- plain functions of the store ---------------------------------------------------------------

def run_ids(store: RunStore) -> list[str]:
    return [r.id for r in store.list()]


def default_run(store: RunStore) -> str | None:
    """The active run, else the most recent one."""
    active = store.active()
    if active is not None:
        return active.id
    runs = store.list()
    return runs[0].id if runs else None


def history_rows(store: RunStore) -> list[list]:
    rows = []
    for r in store.list():
        s = r.summary()
        rows.append([s["id"], s["status"], s["preset"], s["step"], _fmt(s["train_loss"]), _fmt(s["eval_loss"])])
    return rows


def compare_figure(runs: list[Run]) -> go.Figure:
    """One training-loss line per run (validation loss dotted, same colour), on one step axis."""
    if not runs:
        return _empty_figure("choose runs above to compare their loss curves", height=160)
    fig = go.Figure()
    palette = qualitative.Plotly
    for i, run in enumerate(runs):
        evs, color = run.all_events(), palette[i % len(palette)]
        s, v = _series(evs, "metric", "loss")
        fig.add_trace(go.Scatter(x=s, y=v, name=f"{run.id} train", mode="lines", line=dict(color=color),
                                 legendgroup=run.id))
        s, v = _series(evs, "eval", "eval_loss")
        if s:
            fig.add_trace(go.Scatter(x=s, y=v, name=f"{run.id} validation", mode="lines+markers",
                                     line=dict(color=color, dash="dot"), legendgroup=run.id))
    fig.update_layout(height=360, margin=dict(l=10, r=10, t=TOP_MARGIN, b=10), xaxis_title="step",
                      yaxis_title="loss", legend=LEGEND)
    return fig


def check_data(cfg: RunConfig) -> None:
    """Refuse at once a missing or unusable local data file rather than failing a run seconds later."""
    d = cfg.data
    for value in (d.path, d.val_path):
        if value:
            check_size(check_data_path(value))  # only samples and uploads: a browser names no other file
    if not d.path and not d.hub_dataset:
        raise DataError("data.path: no data chosen; upload a file in the Data tab or name a hub dataset.")
    # A local model folder only from the studio's own folders or ones the operator allowed; an output folder
    # that exists and was not made by the studio is refused now, not after the whole run.
    local_model(cfg.model.base_model)
    local_dataset(d.hub_dataset)  # datasets.load_dataset would read a local folder of that name
    if cfg.output.adapter_dir:
        check_output_free(output_dir(cfg.output.adapter_dir))
    check_before_start(cfg)  # the Data tab preview's own checks: Start refuses what the preview refuses


def check_machine(cfg: RunConfig) -> None:
    """This machine's refusals (a GPU-only optimizer or dtype on a CPU, more GPUs than there are, a missing
    package), the worker's own ``preflight`` without reading the model: Start refuses them before any run
    folder exists, as the pre-Start summary says it will."""
    from studio.hardware import detect
    from studio.modeling import preflight

    preflight(cfg, detect(), check_model=False)


# ---- actions (the event handlers' engine side) --------------------------------------------------

def config_for(base: dict, keys: list[str], values: list) -> RunConfig:
    """The config Start trains on; the pre-Start summary (``studio.ui.state``) describes this same value."""
    return to_config(RunConfig.from_dict(base), keys, list(values))


def start_run(store: RunStore, keys: list[str], base: dict, name: str, values: list) -> tuple[str | None, str]:
    """Build the config and launch the worker; returns (run id or None, message)."""
    try:
        cfg = config_for(base, keys, values)
        check_data(cfg)
        check_machine(cfg)
        run = worker.start(store, cfg, (name or "").strip())
    except (ConfigError, DataError, SecurityError, worker.Busy, ValueError, KeyError) as e:
        return None, f"⚠️ {message(e)}"
    except OSError as e:  # e.g. the runs folder is not writable or the disk is full
        return None, f"⚠️ could not create the run: {e}"
    return run.id, f"Started run `{run.id}`: it trains in the background; closing the browser does not stop it."


def stop_run(store: RunStore, grace: float = STOP_GRACE) -> str:
    run = store.active()
    if run is None:
        return "No run is training."
    status = worker.stop(run, grace=grace)
    ck = run.last_checkpoint()
    return f"Run `{run.id}` is {status}" + (f"; its last checkpoint is {ck.name}." if ck else ".")


def resume_run(store: RunStore, run_id: str | None) -> tuple[str | None, str]:
    if not run_id:
        return None, "⚠️ choose a run to resume."
    try:
        run = worker.resume(store, store.get(run_id))
    except (worker.Busy, SecurityError, ValueError, KeyError) as e:
        return None, f"⚠️ {message(e)}"
    ck = run.last_checkpoint()
    return run.id, f"Resuming run `{run.id}` from {ck.name if ck else 'its last checkpoint'}."


def run_status(store: RunStore, run_id: str) -> dict:
    """The status of a run as JSON: status, step, losses and, when it ended badly, message and remedy."""
    try:
        run = store.get(run_id)
    except (SecurityError, KeyError) as e:
        return {"id": run_id, "status": "unknown", "message": message(e)}
    s, last = run.summary(), run.last_status()
    metric = _last(run.all_events(), "metric") or {}
    out = {"id": run.id, "status": s["status"], "step": s["step"], "max_steps": metric.get("max_steps"),
           "train_loss": s["train_loss"], "eval_loss": s["eval_loss"], "has_adapter": s["has_adapter"]}
    out.update({k: last[k] for k in ("message", "remedy") if k in last})
    if s["warnings"]:
        out["warnings"] = s["warnings"]  # what was skipped while reading the run folder
    return out


def _session(session: dict | None) -> dict:
    s = dict(session or {})
    return {"live": list(s.get("live", [])), "notified": list(s.get("notified", [])), "key": s.get("key"),
            "ids": list(s.get("ids", [])), "listed_at": s.get("listed_at", 0.0), "training": s.get("training")}


def poll(store: RunStore, selected: str | None, session: dict | None) -> tuple[str | None, dict, list, bool]:
    """One tick's bookkeeping: follow a newly active run, and collect the toasts of runs that ended.

    Returns (selected run id, session, [(level, text)], whether a run started or ended).  ``session``
    holds the runs seen live in this browser, the run endings already announced, the key of the view
    drawn last, the run ids listed last, when the history was drawn and whether Stop was enabled.
    """
    s = _session(session)
    active = store.active()
    changed = False
    if active is not None and active.id not in s["live"]:
        s["live"].append(active.id)  # started here, in another browser or from the CLI: show it
        selected, changed = active.id, True
    elif s["ids"]:
        # A run that appeared since the last listing but is no longer live (it failed or ended between two
        # ticks, or a tick drawn before Start overwrote the choice) is still the one to show.
        fresh = [r.id for r in store.list() if r.id not in s["ids"]]
        if fresh and selected not in fresh:
            selected, changed = fresh[0], True
    if not selected:
        selected = default_run(store)
        changed = changed or selected is not None
    notices = []
    for rid in [r for r in s["live"] if active is None or r != active.id]:
        s["live"].remove(rid)
        changed = True
        try:
            run = store.get(rid)
        except (SecurityError, KeyError):
            continue
        last = run.last_status()
        tag = f"{rid}@{last.get('t')}"  # one toast per ending, even if two ticks overlap
        if tag in s["notified"]:
            continue
        s["notified"].append(tag)
        notice = finish_notice(rid, run.status, last)
        if notice:
            notices.append(notice)
    return selected, s, notices, changed


def view(ctx, run_id: str | None, unchanged_since: tuple | None = None) -> tuple[tuple, tuple | None]:
    """The run's view (status, progress, loss figure, memory figure, samples, log) and its change key.

    When the key equals ``unchanged_since`` nothing new reached the folder: only the progress line
    (its clock runs) is redrawn while the run is live, the rest is skipped.
    """
    try:
        run = ctx.store.get(run_id) if run_id else None
    except (SecurityError, KeyError) as e:
        return (f"⚠️ {message(e)}", "", _empty_figure(""), _empty_figure(""), _samples_df([]), ""), None
    if run is None:
        return ("No runs yet: choose data and a preset, then press Start.", "",
                _empty_figure("no run yet"), _empty_figure("no run yet", 300), _samples_df([]), ""), None
    events = ctx.follower.snapshot(run)
    status = status_of(events, run.worker_alive())
    log = log_tail(run)
    key = (run.id, len(events), status, len(log))
    if key == unchanged_since:
        progress = progress_text(events, status) if status in LIVE else gr.skip()
        return (gr.skip(), progress, gr.skip(), gr.skip(), gr.skip(), gr.skip()), key
    return (status_text(run.id, events, status), progress_text(events, status), loss_figure(events),
            memory_figure(events), _samples_df(sample_rows(events)), log), key


def refresh(ctx, selected: str | None, session: dict | None, force: bool = False) -> tuple:
    """Page load (``force``) and timer tick: toasts for runs that ended, then the outputs
    (run choice, history, compare choices, Stop button, session, *view); unchanged parts are skipped."""
    selected, s, notices, changed = poll(ctx.store, selected, session)
    for level, text in notices:
        # A failure stays on screen until closed: its remedy is worth reading.
        (gr.Info if level == "info" else gr.Warning)(text, duration=None if level == "warning" else 10)
    before = s["key"]
    shown, s["key"] = view(ctx, selected, None if force else before)
    ids = run_ids(ctx.store)
    now = time.monotonic()
    if force or changed or ids != s["ids"]:  # a run started, ended or appeared (another browser, the CLI)
        listed = (gr.Dropdown(choices=ids, value=selected), _history_df(ctx.store), gr.Dropdown(choices=ids))
        s["listed_at"] = now
    elif s["key"] != before and now - s["listed_at"] >= HISTORY_EVERY_S:
        # The run shown moved on (status, step, losses): its history row follows, a few times a minute.
        listed = (gr.skip(), _history_df(ctx.store), gr.skip())
        s["listed_at"] = now
    else:
        listed = (gr.skip(),) * 3
    s["ids"] = ids
    training = ctx.store.active() is not None
    stop = gr.skip() if training == s["training"] and not force else gr.Button(interactive=training)
    s["training"] = training
    return (*listed, stop, s, *shown)


def _samples_df(rows: list[list]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=SAMPLE_HEADERS)


def _history_df(store: RunStore) -> pd.DataFrame:
    return pd.DataFrame(history_rows(store), columns=HISTORY_HEADERS)


# ---- the tab ------------------------------------------------------------------------------------

def build(ctx, data_ui, presets_ui) -> TrainUI:
    store = ctx.store
    keys = list(presets_ui.keys) + list(data_ui.keys)
    with gr.Accordion("Before you start: what Start would train on", open=True):
        summary = gr.Markdown("Reading your choices…", elem_id="train-summary")
    # No label box over the name: the textbox is then as tall as the buttons beside it.
    with gr.Row(equal_height=True):
        run_name = gr.Textbox(value="", label="Run name (optional)", show_label=False, container=False,
                              elem_id="train-run-name", scale=3,
                              placeholder="Run name (optional): letters, digits, . _ -; empty: preset and time")
        start = gr.Button("Start", variant="primary", elem_id="train-start", scale=1, min_width=100)
        stop = gr.Button("Stop", variant="stop", elem_id="train-stop", scale=1, min_width=100,
                         interactive=store.active() is not None)
        resume = gr.Button("Resume", elem_id="train-resume", scale=1, min_width=100)
    message = gr.Markdown(label="Message", elem_id="train-message")
    stage_ui = stage.build(ctx)
    # Custom values allowed: run folders appear after the page is built (another browser, the CLI),
    # and every id goes through store.get, which validates it.
    run = gr.Dropdown(label="Run shown", choices=[], value=None, allow_custom_value=True, elem_id="train-run",
                      info="The active run is shown by default; choose any past run.")
    status = gr.Markdown(label="Status", elem_id="train-status")
    progress = gr.HTML(elem_id="train-progress")
    with gr.Row():
        loss_plot = gr.Plot(label="Training curves", elem_id="train-loss-plot", scale=3)
        memory_plot = gr.Plot(label="Memory", elem_id="train-memory", scale=2)
    samples = gr.Dataframe(value=_samples_df([]), label="Answers to the validation prompts at each evaluation",
                           interactive=False, wrap=True, elem_id="train-samples", max_height=360)
    # Tall enough for every line kept, so the newest line is always in view without scrolling.
    log = gr.Textbox(label=f"Worker log (last {LOG_LINES} lines, newest at the bottom)", lines=LOG_LINES,
                     max_lines=2 * LOG_LINES, interactive=False, autoscroll=True, elem_id="train-log")
    with gr.Accordion("Run history and comparison", open=True):
        history = gr.Dataframe(value=pd.DataFrame(columns=HISTORY_HEADERS), label="Runs (select a row to show it)",
                               interactive=False, elem_id="train-history", max_height=320)
        compare = gr.Dropdown(label="Compare loss curves of", choices=[], value=[], multiselect=True,
                              elem_id="train-compare")
        compare_plot = gr.Plot(compare_figure([]), label="Loss curves compared", elem_id="train-compare-plot")
    timer = gr.Timer(ctx.timer_seconds)
    session = gr.State({})
    ui = TrainUI(run_name, start, stop, resume, message, run, status, progress, loss_plot, memory_plot, samples,
                 log, history, compare, compare_plot, timer, session, summary, stage_ui)
    view_outputs = [status, progress, loss_plot, memory_plot, samples, log]

    tick_outputs = [run, history, compare, stop, session, *view_outputs]
    gr.on(None, lambda: refresh(ctx, None, None, force=True), inputs=[], outputs=tick_outputs,
          api_visibility="private")  # page load: the active run, else the most recent
    timer.tick(lambda sel, s: refresh(ctx, sel, s), inputs=[run, session], outputs=tick_outputs,
               api_visibility="private", show_progress="hidden")

    def show(selected, session):
        shown, key = view(ctx, selected)
        return (*shown, {**_session(session), "key": key})

    run.input(show, inputs=[run, session], outputs=[*view_outputs, session], api_visibility="private")

    def pick_row(session, evt: gr.SelectData):
        rid = (evt.row_value or [None])[0]
        return (gr.Dropdown(value=rid), *show(rid, session))

    history.select(pick_row, inputs=[session], outputs=[run, *view_outputs, session], api_visibility="private")
    compare.change(lambda ids: compare_figure(_runs(store, ids)), inputs=[compare], outputs=[compare_plot],
                   api_visibility="private")

    # Defaults of None make the run shown optional for API clients (gradio reads them from the signature).
    def on_start(shown=None, session=None, base=None, name="", *values):
        rid, msg = start_run(store, keys, base, name, list(values))
        if rid is None:  # the run shown stays; the message says why nothing started
            return shown, msg, gr.skip()
        s = _session(session)
        s["live"].append(rid)  # so its ending is announced even if it fails before the next tick
        # A plain value, so API clients get the id; the next tick adds it to the choices and the history.
        return rid, msg, s

    # API callers name each field by its config key (train__max_steps, data__path), as /estimate does.
    start_inputs = [run, session, presets_ui.base, run_name, *presets_ui.inputs, *data_ui.inputs]
    start.click(named(on_start, ["run", "session", "base", "run_name", *keys],
                      [None, None, None, "", *(c.value for c in start_inputs[4:])]),
                inputs=start_inputs,
                outputs=[run, message, session], api_name="start")
    stop.click(lambda: stop_run(store), inputs=[], outputs=[message], api_name="stop",
               concurrency_limit=None)  # never queue a stop behind anything

    def on_resume(run_id, session):
        rid, msg = resume_run(store, run_id)
        if rid is None:
            return msg, gr.skip()
        s = _session(session)
        s["live"].append(rid)
        return msg, s

    resume.click(on_resume, inputs=[run, session], outputs=[message, session], api_name="resume")

    def status_api(run_id: str) -> dict:
        """Status of a run: status, step, max_steps, train_loss, eval_loss and any message/remedy."""
        return run_status(store, run_id)

    gr.api(status_api, api_name="status")
    stage.wire(ui, stage_ui, store)
    return ui


def _runs(store: RunStore, ids: list[str] | None) -> list[Run]:
    out = []
    for rid in ids or []:
        try:
            out.append(store.get(rid))
        except (SecurityError, KeyError):
            continue  # a run folder removed since the list was drawn
    return out
