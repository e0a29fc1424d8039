"""Evaluate tab: a finished run's base-vs-tuned scores on its held-out examples, with the best and worst.

Contract:
- ``build(ctx)`` (inside an open ``gr.Blocks``) returns an ``EvaluateUI``; runs come from the run store
  (those with a final adapter), scores from ``studio.evaluate.evaluate_run``.
- Choosing a run, and every page load, shows its saved ``<run>/evaluation.json`` when there is one, so a
  reload, a second browser or an app restart shows the same numbers.
- The example tables show the whole prompt (the instruction, a blank line, the input) with its line breaks,
  and keep every column in view (shared widths, wrapped text; ``app.CSS``).
- The result tables stay hidden (in the page, taking no room) until there are scores to show.
- Named endpoint ``evaluate`` (run id, limit, max new tokens -> status, table [metric, base, tuned],
  best examples, worst examples); examples have columns prompt, reference, base, tuned, ROUGE-L.  For a
  preference stage the two sides are the SFT adapter it started from and the stage (headers ``sft``, ``dpo``).
- Errors become the status line, never a traceback.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import gradio as gr

from studio.evaluate import Evaluation, evaluate_run
from studio.playground import gpu_busy
from studio.runs import Run, RunStore
from studio.ui.run_picker import has_adapter, picker, refresh_runs
from studio.ui.messages import USER_ERRORS, message

TABLE_HEADERS = ["metric", "base", "tuned"]
EXAMPLE_HEADERS = ["prompt", "reference", "base", "tuned", "ROUGE-L (tuned)"]
EXAMPLES_SHOWN = 3


def empty() -> tuple[dict, dict, dict]:
    return ({"headers": TABLE_HEADERS, "data": []}, {"headers": EXAMPLE_HEADERS, "data": []},
            {"headers": EXAMPLE_HEADERS, "data": []})


def whole_prompt(r: dict) -> str:
    """The prompt as the model got it: the instruction and, when the example has one, its input."""
    prompt, extra = r.get("prompt", ""), (r.get("input") or "").strip()
    return f"{prompt}\n\n{extra}" if extra else prompt


# Every column in view on a laptop: widths share the table, long texts wrap instead of pushing columns away.
EXAMPLE_WIDTHS = ["28%", "18%", "22%", "22%", "10%"]
# Three examples of wrapped answers are taller than Gradio's 500 px default: all of them in view, no inner scroll.
TABLE_MAX_HEIGHT = 1200


def tables(ev: Evaluation) -> tuple[dict, dict, dict]:
    """(scores table, best examples, worst examples) as Dataframe values."""
    def rows(examples):
        return [[whole_prompt(r), r.get("reference", ""), r.get("base", ""), r.get("tuned", ""),
                 round(float(r.get("tuned_rouge_l", 0.0)), 3)] for r in examples]

    best, worst = ev.best_worst(EXAMPLES_SHOWN)
    # A preference stage's two sides are its SFT start and itself: the headers name them.
    a, b = ev.labels.get("base", "base"), ev.labels.get("tuned", "tuned")
    table_headers, example_headers = ["metric", a, b], ["prompt", "reference", a, b, f"ROUGE-L ({b})"]
    return ({"headers": table_headers, "data": ev.table()}, {"headers": example_headers, "data": rows(best)},
            {"headers": example_headers, "data": rows(worst)})


def results_visible(table: dict) -> bool | str:
    """Visibility of the results: shown once there are scores, else hidden but kept in the page."""
    return True if table["data"] else "hidden"


def saved(run: Run) -> Evaluation | None:
    from studio.runs import read_regular

    try:  # a regular file only: a FIFO or a link planted in the run folder is neither waited on nor followed
        ev = Evaluation(**json.loads(read_regular(run.dir / "evaluation.json", limit=64 * 2**20)))
        tables(ev)  # every field the tab shows is there and of its type
        return ev
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None  # missing, torn, garbled or of an older format: evaluate again


def show_saved(store: RunStore, run_id: str | None):
    """-> (status, table, best, worst) from the run's saved evaluation, if any."""
    if not run_id:
        return ("Choose a finished run.", *empty())
    try:
        run = store.get(run_id)
    except USER_ERRORS as e:
        return (f"**Error:** {message(e)}", *empty())
    ev = saved(run)
    if ev is None:
        return (f"Run `{run.id}` has not been evaluated yet.", *empty())
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime((run.dir / "evaluation.json").stat().st_mtime))
    return (f"Saved evaluation of `{run.id}` on {ev.n} held-out examples ({when}).", *tables(ev))


def evaluate(store: RunStore, run_id: str | None, limit, max_new_tokens):
    """-> (status, table, best, worst) after evaluating the run on up to ``limit`` held-out examples."""
    if not run_id:
        return ("Choose a finished run.", *empty())
    try:
        run = store.get(run_id)
        if not has_adapter(run):
            raise ValueError(f"run {run.id!r} has no final adapter yet; finish (or resume) the run first.")
        busy = gpu_busy(store)
        if busy:
            raise RuntimeError(busy)
        t0 = time.time()
        ev = evaluate_run(run, limit=int(limit), max_new_tokens=int(max_new_tokens))
    except USER_ERRORS as e:
        return (f"**Could not evaluate:** {message(e)}", *empty())
    return (f"Evaluated `{run.id}` on {ev.n} held-out examples in {time.time() - t0:.0f} s.", *tables(ev))


@dataclass
class EvaluateUI:
    run: gr.Dropdown
    refresh: gr.Button
    limit: gr.Slider
    max_new_tokens: gr.Slider
    evaluate: gr.Button
    status: gr.Markdown
    table: gr.Dataframe
    best: gr.Dataframe
    worst: gr.Dataframe


def build(ctx) -> EvaluateUI:
    store = ctx.store
    run, refresh, first_id = picker(store, "eval", "Runs with a final adapter.")
    status0, table0, best0, worst0 = show_saved(store, first_id)
    with gr.Row():
        limit = gr.Slider(1, 500, value=50, step=1, label="examples",
                          info="How many held-out examples to score.", elem_id="eval-limit")
        max_new = gr.Slider(8, 512, value=64, step=1, label="max new tokens",
                            info="Answer length for exact match and ROUGE-L.", elem_id="eval-max-new-tokens")
    eval_btn = gr.Button("Evaluate", variant="primary", elem_id="eval-start")
    status = gr.Markdown(status0, elem_id="eval-status")
    # Empty tables say nothing: they appear with the first scores.  "hidden" keeps them in the page
    # (without taking room), so their progress shows while an evaluation runs.
    with gr.Column(visible=results_visible(table0), elem_id="eval-results") as results:
        table = gr.Dataframe(table0, label="Base vs tuned", interactive=False, elem_id="eval-table")
        best = gr.Dataframe(best0, label="Best examples (tuned ROUGE-L)", interactive=False, wrap=True,
                            column_widths=EXAMPLE_WIDTHS, max_height=TABLE_MAX_HEIGHT, elem_id="eval-best")
        worst = gr.Dataframe(worst0, label="Worst examples (tuned ROUGE-L)", interactive=False, wrap=True,
                             column_widths=EXAMPLE_WIDTHS, max_height=TABLE_MAX_HEIGHT, elem_id="eval-worst")

    def on_refresh(current):
        return refresh_runs(store, current)

    def with_results(out):
        return (*out, gr.Column(visible=results_visible(out[1])))

    def on_select(run_id):
        return with_results(show_saved(store, run_id))

    def on_evaluate(run_id, n, max_new_tokens):
        return with_results(evaluate(store, run_id, n, max_new_tokens))

    refresh.click(on_refresh, run, run, api_visibility="private")
    # On page load: pick up runs that finished since the app started (the newest first), then show the chosen
    # run's saved scores: the page was built with those of app start, and a run kept as it was sends no change.
    gr.on(None, lambda: refresh_runs(store, None), outputs=run, api_visibility="private") \
        .then(on_select, run, [status, table, best, worst, results], api_visibility="private")
    # The column is a layout block: API clients still get (status, table, best, worst).
    run.change(on_select, run, [status, table, best, worst, results], api_visibility="private")
    eval_btn.click(on_evaluate, [run, limit, max_new], [status, table, best, worst, results], api_name="evaluate")
    return EvaluateUI(run, refresh, limit, max_new, eval_btn, status, table, best, worst)
