"""Playground tab: base and tuned answers side by side, a checkpoint comparison table and blind A/B votes.

Contract:
- ``build(ctx)`` (inside an open ``gr.Blocks``) returns a ``PlaygroundUI``; it draws runs only from the
  run store and generates only through ``ctx.holder`` (one base model, adapters toggled under its lock).
- Named endpoints: ``load`` (run id, checkpoint names -> status, tuned-adapter choice), ``generate``
  (prompt, adapter, sampling -> base text, tuned text, streamed), ``compare`` (prompts -> table with a
  column per loaded adapter), ``ab`` (prompt, adapter, sampling -> answer A, answer B, the mapping kept
  in server-side state) and ``vote`` (A / B / tie -> tally, status).
- Base and tuned answers use the same sampling settings and seed and the run's template.
- Votes for A or B append a prompt/chosen/rejected pair to ``preferences.jsonl`` with
  ``meta["winner"]`` in {"tuned", "base"}; ties are only counted in the session tally.
- Errors reach the user as a status line or a ``gr.Warning``, never a traceback.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import gradio as gr

from studio import playground as engine
from studio.generate import Sampling
from studio.runs import Run, RunStore
from studio.ui.run_picker import has_weights, picker, refresh_runs
from studio.ui.messages import USER_ERRORS, message

AB_CHOICES = ["A", "B", "tie"]
COMPARE_MAX_PROMPTS = 20
DEFAULT_CHECKPOINTS = 3



# ---------------------------------------------------------------- runs and adapters

def example_prompts(run: Run, n: int = 3) -> list[str]:
    """The first instructions of the run's validation split (else its training data), one line each."""
    from studio.data.pipeline import train_val_examples

    train, val = train_val_examples(run.config().data)
    return [" ".join(ex.instruction.split()) for ex in (val or train)[:n]]


def run_defaults(store: RunStore, run_id: str | None) -> tuple[list[str], list[str], str | None]:
    """(checkpoint names, the latest few preselected, prefilled prompts or None) for a run."""
    if not run_id:
        return [], [], None
    run = store.get(run_id)
    names = [p.name for p in run.checkpoints()]
    try:
        prompts = "\n".join(example_prompts(run))
    except USER_ERRORS:
        prompts = None  # the data file moved or is gone; the user types prompts instead
    return names, names[-DEFAULT_CHECKPOINTS:], prompts


def select_run(store: RunStore, run_id: str | None):
    """-> (checkpoint checkbox group, comparison prompts) for the chosen run."""
    try:
        names, chosen, prompts = run_defaults(store, run_id)
    except USER_ERRORS as e:
        gr.Warning(message(e))
        names, chosen, prompts = [], [], None
    return gr.CheckboxGroup(choices=names, value=chosen), gr.skip() if prompts is None else prompts


def load(holder: engine.ModelHolder, store: RunStore, run_id: str | None, checkpoints: list[str] | None):
    """Load the run's base once plus its final adapter and the chosen checkpoints -> (status, adapter choice)."""
    if not run_id:
        return "Choose a run first.", gr.Dropdown(choices=[], value=None)
    try:
        run = store.get(run_id)
        names = holder.load(run, list(checkpoints or []), store)
    except USER_ERRORS as e:
        return f"**Could not load:** {message(e)}", gr.Dropdown(choices=holder.adapters,
                                                               value=holder.adapters[0] if holder.adapters else None)
    base = run.config().model.base_model
    return (f"Loaded `{base}` from run `{run.id}` with adapters: {', '.join(names)}.",
            gr.Dropdown(choices=names, value=names[0]))


# ---------------------------------------------------------------- generation

def sampling(max_new_tokens, temperature, top_p, repetition_penalty, seed) -> Sampling:
    return Sampling(int(max_new_tokens), float(temperature), float(top_p), float(repetition_penalty), int(seed or 0))


def _check_prompt(holder: engine.ModelHolder, prompt: str, adapter: str | None) -> None:
    if not (prompt or "").strip():
        raise engine.PlaygroundError("type a prompt first.")
    if holder.model is None:
        raise engine.PlaygroundError("load a run first.")
    if not adapter:
        raise engine.PlaygroundError("choose the tuned adapter to compare with the base.")


def generate(holder: engine.ModelHolder, prompt: str, adapter: str | None, s: Sampling):
    """Yield (base text, tuned text) as both grow: the base first, then the tuned adapter."""
    try:
        _check_prompt(holder, prompt, adapter)
        base = ""
        for base in holder.stream(prompt, None, s):
            yield base, ""
        tuned = ""
        for tuned in holder.stream(prompt, adapter, s):
            yield base, tuned
    except USER_ERRORS as e:
        gr.Warning(message(e))
        yield gr.skip(), gr.skip()


def parse_prompts(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()][:COMPARE_MAX_PROMPTS]


def compare(holder: engine.ModelHolder, prompts_text: str, s: Sampling):
    """Yield the table (prompt, base, one column per loaded adapter), growing one row at a time."""
    prompts = parse_prompts(prompts_text)
    headers = ["prompt", "base", *holder.adapters]
    rows: list[list[str]] = []
    try:
        if holder.model is None:
            raise engine.PlaygroundError("load a run first.")
        if not prompts:
            raise engine.PlaygroundError("enter at least one prompt, one per line.")
        for p in prompts:
            rows.append([p, holder.answer(p, None, s), *(holder.answer(p, a, s) for a in holder.adapters)])
            yield {"headers": headers, "data": rows}
    except USER_ERRORS as e:
        gr.Warning(message(e))
        yield {"headers": headers, "data": rows}


# ---------------------------------------------------------------- blind A/B

def blind_pair(holder: engine.ModelHolder, prompt: str, adapter: str | None, s: Sampling, rng=random):
    """Yield (A text, B text, mapping): base and tuned in random order; the mapping comes with the last
    yield only, so a half-streamed pair cannot be voted on.  A streams first whichever model it is, so
    the order of streaming gives nothing away."""
    try:
        _check_prompt(holder, prompt, adapter)
        order = [("base", None), ("tuned", adapter)]
        rng.shuffle(order)
        texts = ["", ""]
        for i, (_, name) in enumerate(order):
            for text in holder.stream(prompt, name, s):
                texts[i] = text
                yield texts[0], texts[1], None
        mapping = {"prompt": prompt, "run": holder.run.id, "adapter": adapter,
                   "A": {"who": order[0][0], "text": texts[0]}, "B": {"who": order[1][0], "text": texts[1]}}
        yield texts[0], texts[1], mapping
    except USER_ERRORS as e:
        gr.Warning(message(e))
        yield gr.skip(), gr.skip(), None


def tally_text(session: dict) -> str:
    saved = engine.tally()
    return (f"**This session:** tuned {session['tuned']} · base {session['base']} · tie {session['tie']}  \n"
            f"**All saved votes:** tuned {saved['tuned']} · base {saved['base']} (of {saved['total']})")


def vote(choice: str | None, mapping: dict | None, session: dict | None):
    """Record a vote -> (tally text, status, cleared mapping, session tally)."""
    session = dict(session or {"tuned": 0, "base": 0, "tie": 0})
    if not mapping:
        return tally_text(session), "Generate a blind pair first.", None, session
    if choice not in AB_CHOICES:
        return tally_text(session), "Vote A, B or tie.", mapping, session
    reveal = f"A was **{mapping['A']['who']}**, B was **{mapping['B']['who']}** (adapter `{mapping['adapter']}`)."
    if choice == "tie":
        session["tie"] += 1
        return tally_text(session), f"Tie counted (not saved as a preference pair). {reveal}", None, session
    win, lose = (mapping["A"], mapping["B"]) if choice == "A" else (mapping["B"], mapping["A"])
    try:
        engine.record_vote(mapping["prompt"], win["text"], lose["text"],
                           meta={"winner": win["who"], "run": mapping["run"], "adapter": mapping["adapter"]})
    except OSError as e:
        return tally_text(session), f"**Could not save the vote:** {message(e)}", mapping, session
    session[win["who"]] += 1
    return tally_text(session), f"Saved: {choice} ({win['who']}) preferred. {reveal}", None, session


# ---------------------------------------------------------------- layout

@dataclass
class PlaygroundUI:
    run: gr.Dropdown
    refresh: gr.Button
    checkpoints: gr.CheckboxGroup
    load: gr.Button
    status: gr.Markdown
    adapter: gr.Dropdown
    max_new_tokens: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider
    repetition_penalty: gr.Slider
    seed: gr.Number
    prompt: gr.Textbox
    generate: gr.Button
    base_out: gr.Textbox
    tuned_out: gr.Textbox
    prompts: gr.Textbox
    compare: gr.Button
    table: gr.Dataframe
    ab_generate: gr.Button
    ab_a: gr.Textbox
    ab_b: gr.Textbox
    ab_choice: gr.Radio
    vote: gr.Button
    ab_status: gr.Markdown
    tally: gr.Markdown
    ab_mapping: gr.State
    session_tally: gr.State


def build(ctx) -> PlaygroundUI:
    holder, store = ctx.holder, ctx.store
    run, refresh, first_id = picker(store, "pg", "Runs with a final adapter or checkpoints.", has_weights)
    try:
        ck_names, ck_chosen, first_prompts = run_defaults(store, first_id)
    except USER_ERRORS:
        ck_names, ck_chosen, first_prompts = [], [], None
    checkpoints = gr.CheckboxGroup(choices=ck_names, value=ck_chosen, label="Checkpoints to load",
                                   info="Loaded beside the final adapter (always loaded when the run has one).",
                                   elem_id="pg-checkpoints")
    with gr.Row():
        load_btn = gr.Button("Load", variant="primary", elem_id="pg-load", scale=0)
        status = gr.Markdown("Choose a run and load it.", elem_id="pg-status")
    with gr.Accordion("Generation settings (shared by base and tuned)", open=False):
        with gr.Row():
            adapter = gr.Dropdown(choices=holder.adapters, value=holder.adapters[0] if holder.adapters else None,
                                  label="Tuned adapter", elem_id="pg-adapter")
            max_new = gr.Slider(1, 1024, value=128, step=1, label="max new tokens", elem_id="pg-max-new-tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature",
                                    info="0 = greedy", elem_id="pg-temperature")
        with gr.Row():
            top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.01, label="top-p", elem_id="pg-top-p")
            rep = gr.Slider(1.0, 2.0, value=1.1, step=0.01, label="repetition penalty", elem_id="pg-repetition-penalty")
            seed = gr.Number(value=42, minimum=0, maximum=2**31 - 1, precision=0, label="seed",
                             info="Same seed for both answers, so they differ only by the adapter.", elem_id="pg-seed")
    settings = [max_new, temperature, top_p, rep, seed]

    with gr.Tab("Side by side"):
        prompt = gr.Textbox(label="Prompt", lines=3, elem_id="pg-prompt")
        gen_btn = gr.Button("Generate", variant="primary", elem_id="pg-generate")
        with gr.Row():
            base_out = gr.Textbox(label="Base model", lines=8, interactive=False, elem_id="pg-base-out")
            tuned_out = gr.Textbox(label="Tuned model", lines=8, interactive=False, elem_id="pg-tuned-out")
    with gr.Tab("Compare checkpoints"):
        prompts = gr.Textbox(first_prompts or "", label="Prompts (one per line)", lines=4, elem_id="pg-prompts",
                             info=f"At most {COMPARE_MAX_PROMPTS}; filled from the run's validation examples.")
        cmp_btn = gr.Button("Compare", elem_id="pg-compare")
        table = gr.Dataframe(headers=["prompt", "base", "final"], label="Answers", interactive=False, wrap=True,
                             elem_id="pg-compare-table")
    with gr.Tab("Blind A/B"):
        gr.Markdown("The prompt above, answered by the base and the tuned model in random order.")
        ab_btn = gr.Button("New blind pair", elem_id="pg-ab-generate")
        with gr.Row():
            ab_a = gr.Textbox(label="Answer A", lines=8, interactive=False, elem_id="pg-ab-a")
            ab_b = gr.Textbox(label="Answer B", lines=8, interactive=False, elem_id="pg-ab-b")
        with gr.Row():
            ab_choice = gr.Radio(AB_CHOICES, value=None, label="Which answer is better?", elem_id="pg-ab-choice")
            vote_btn = gr.Button("Submit vote", elem_id="pg-vote", scale=0)
        ab_status = gr.Markdown(elem_id="pg-ab-status")
        session0 = {"tuned": 0, "base": 0, "tie": 0}
        tally = gr.Markdown(tally_text(session0), elem_id="pg-tally")
    ab_mapping = gr.State(None)  # which of A/B is tuned: kept on the server, never sent to the browser
    session_tally = gr.State(session0)

    def on_refresh(current):
        return refresh_runs(store, current, has_weights)

    def on_select(run_id):
        return select_run(store, run_id)

    def on_load(run_id, cks):
        return load(holder, store, run_id, cks)

    def on_generate(text, name, *values):
        yield from generate(holder, text, name, sampling(*values))

    def on_compare(text, *values):
        yield from compare(holder, text, sampling(*values))

    def on_ab(text, name, *values):
        yield from blind_pair(holder, text, name, sampling(*values))

    refresh.click(on_refresh, run, run, api_visibility="private")
    # On page load: pick up runs that finished since the app started (the newest first).
    gr.on(None, lambda: refresh_runs(store, None, has_weights), outputs=run, api_visibility="private")
    run.change(on_select, run, [checkpoints, prompts], api_visibility="private")
    load_btn.click(on_load, [run, checkpoints], [status, adapter], api_name="load")
    gen_btn.click(on_generate, [prompt, adapter, *settings], [base_out, tuned_out], api_name="generate")
    prompt.submit(on_generate, [prompt, adapter, *settings], [base_out, tuned_out], api_visibility="private")
    cmp_btn.click(on_compare, [prompts, *settings], table, api_name="compare")
    ab_btn.click(on_ab, [prompt, adapter, *settings], [ab_a, ab_b, ab_mapping], api_name="ab")
    vote_btn.click(vote, [ab_choice, ab_mapping, session_tally], [tally, ab_status, ab_mapping, session_tally],
                   api_name="vote")
    return PlaygroundUI(run, refresh, checkpoints, load_btn, status, adapter, max_new, temperature, top_p, rep, seed,
                        prompt, gen_btn, base_out, tuned_out, prompts, cmp_btn, table, ab_btn, ab_a, ab_b,
                        ab_choice, vote_btn, ab_status, tally, ab_mapping, session_tally)
