"""Playground tab: chat with two models side by side, compare checkpoints on a prompt list, vote blind A/B.

Contract:
- ``build(ctx)`` (inside an open ``gr.Blocks``) returns a ``PlaygroundUI``; it draws runs only from the
  run store and generates only through ``ctx.holder`` (one base model, adapters toggled under its lock).
- **Chat side by side**: two ``gr.Chatbot`` chats, each with its model (base, the final adapter or a loaded
  checkpoint), one shared input, streaming, multi-turn: each side's prompt is its own conversation rendered
  with the run's template or the model's chat template (``ModelHolder.render_chat``).  Regenerate answers the
  last message again with the next seed; Clear empties both.  Same sampling settings and seed on both sides.
- **Blind A/B**: a conversation where each message is answered by the base and the tuned model in random order
  (A and B); a vote saves the pair (``preferences.jsonl``, format in ``studio.playground``) with the whole
  rendered conversation as its prompt, and the conversation goes on from the chosen answer (A on a tie).
  The votes file's path, its count and a download are shown; the tally of this session and of all votes too.
- Named endpoints: ``load`` (run id, checkpoint names -> status, tuned-adapter choice), ``chat`` (message, two
  histories, two model names, sampling -> two histories, cleared input), ``generate`` (prompt, adapter,
  sampling -> base text, tuned text, streamed), ``compare`` (prompts -> table with a column per loaded
  adapter; a prompt line may carry its input after `` ### Input: ``), ``ab`` (one prompt -> answer A,
  answer B, the mapping kept in server-side state) and ``vote`` (A / B / tie -> tally, status).
- The comparison table shows the whole prompt (its input below it) and every answer with its line breaks, each
  model's column an equal share of the width (``compare_widths``, set at Load), so all stay in view.
- Votes for A or B append a prompt/chosen/rejected pair with ``winner`` in {"tuned", "base"} (the adapters'
  names when the tuned adapter is pitted against another, e.g. a DPO stage against its SFT start); ties, and
  votes between two equal answers, are only counted in the session tally.
- The tally area shows how many pairs the loaded run has (``pairs_update``) and "Train on these votes", which
  the app links to the Train tab's preference stage (``studio.ui.stage.link_playground``).
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
INPUT_MARK = " ### Input: "  # a comparison prompt's input, on the prompt's own line
DEFAULT_CHECKPOINTS = 3



# ---------------------------------------------------------------- runs and adapters

def example_prompts(run: Run, n: int = 3) -> list[str]:
    """The first instructions of the run's validation split (else its training data), one line each."""
    from studio.data.pipeline import train_val_examples

    train, val = train_val_examples(run.config().data)
    return [" ".join(ex.instruction.split()) + (f"{INPUT_MARK}{' '.join(ex.input.split())}" if ex.input.strip() else "")
            for ex in (val or train)[:n]]


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


def split_input(line: str) -> tuple[str, str]:
    """A prompt line's instruction and input (written after `` ### Input: `` on the same line)."""
    head, _, tail = line.partition(INPUT_MARK)
    return head.strip(), tail.strip()


def whole_prompt(line: str) -> str:
    """The prompt as the table shows it: the instruction and, below it, its input."""
    instruction, inp = split_input(line)
    return f"{instruction}\n\n{inp}" if inp else instruction


def parse_prompts(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()][:COMPARE_MAX_PROMPTS]


def compare_widths(n_models: int) -> list[str]:
    """Column widths: the prompt a share like a model's (16% at least), the models split the rest, so every
    model's column stays in view however many checkpoints are loaded."""
    prompt = max(16, 100 // (n_models + 1))
    return [f"{prompt}%", *[f"{(100 - prompt) / n_models:.2f}%"] * n_models]


def compare_table(value: dict):
    """The table as drawn: ``compare``'s value with the column widths for its number of models."""
    return gr.Dataframe(value, column_widths=compare_widths(len(value["headers"]) - 1))


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
            instruction, inp = split_input(p)
            rows.append([whole_prompt(p), holder.answer(instruction, None, s, input=inp),
                         *(holder.answer(instruction, a, s, input=inp) for a in holder.adapters)])
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
    named = "".join(f" · {k} {v}" for k, v in session.items() if k not in ("tuned", "base", "tie"))
    return (f"**This session:** tuned {session['tuned']} · base {session['base']}{named} · tie {session['tie']}  \n"
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
    if win["text"].strip() == lose["text"].strip():
        # Two equal answers teach no preference (and a stage refuses such a pair): a tie in all but name.
        session["tie"] += 1
        return (tally_text(session), f"Both answers are the same text: counted as a tie, not saved as a pair. "
                f"{reveal}", None, session)
    try:
        meta = {"winner": win["who"], "run": mapping["run"], "adapter": mapping["adapter"]}
        meta.update({k: mapping[k] for k in ("turn", "messages", "base_model", "against") if k in mapping})
        engine.record_vote(mapping["prompt"], win["text"], lose["text"], meta=meta)
    except OSError as e:
        return tally_text(session), f"**Could not save the vote:** {message(e)}", mapping, session
    session[win["who"]] = session.get(win["who"], 0) + 1  # two adapters compared: counted by name
    return tally_text(session), f"Saved: {choice} ({win['who']}) preferred. {reveal}", None, session


# ---------------------------------------------------------------- chat

BASE = "base"


def plain(history) -> list[dict]:
    """A Chatbot's value as role/content messages with text content (Gradio sends content as parts)."""
    out = []
    for m in history or []:
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", "")
        if isinstance(content, list):
            content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", "")
        out.append({"role": role, "content": content if isinstance(content, str) else str(content or "")})
    return out


def model_choices(holder: engine.ModelHolder) -> list[str]:
    return [BASE, *holder.adapters]


def start_adapter(holder: engine.ModelHolder) -> str | None:
    """A loaded preference stage's starting adapter (``sft``, or ``start`` for a stage on a stage), else None."""
    return next((a for a in holder.adapters if a in engine.START_ADAPTERS), None)


def against_choices(holder: engine.ModelHolder) -> list[str]:
    """What the blind A/B can pit the tuned adapter against: the base, or another loaded adapter (a stage's
    starting adapter, a checkpoint)."""
    return [BASE, *holder.adapters]


def _adapter_of(name: str | None) -> str | None:
    return None if name in (None, "", BASE) else name


def _check_chat(holder: engine.ModelHolder, text: str, *models) -> None:
    if not (text or "").strip():
        raise engine.PlaygroundError("type a message first.")
    if holder.model is None:
        raise engine.PlaygroundError("load a run first.")
    for m in models:
        if m != BASE and m not in holder.adapters:
            raise engine.PlaygroundError(f"choose the models to chat with ({m!r} is not loaded).")


def chat_turn(holder: engine.ModelHolder, text: str, left, right, left_model: str, right_model: str, s: Sampling):
    """Yield (left history, right history, input box) as both answers stream: each side's model answers the
    same message after its own earlier answers, the left first (one model, one generation at a time)."""
    try:
        _check_chat(holder, text, left_model, right_model)
        sides = [plain(left), plain(right)]
        for i, name in enumerate((left_model, right_model)):
            before = sides[i]
            sides[i] = [*before, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
            for piece in holder.stream_chat(before, text, _adapter_of(name), s):
                sides[i][-1]["content"] = piece
                yield sides[0], sides[1], ""
        yield sides[0], sides[1], ""
    except USER_ERRORS as e:
        gr.Warning(message(e))
        yield gr.skip(), gr.skip(), gr.skip()


def last_user(history) -> tuple[list[dict], str | None]:
    """(the history before the last user message, that message) for a regenerate."""
    h = plain(history)
    for i in range(len(h) - 1, -1, -1):
        if h[i]["role"] == "user":
            return h[:i], h[i]["content"]
    return h, None


def regenerate(holder: engine.ModelHolder, left, right, left_model: str, right_model: str, s: Sampling,
               count: int):
    """Answer the last message again on both sides with a new seed -> yields (left, right, input, count)."""
    left0, text = last_user(left)
    right0, _ = last_user(right)
    if text is None:
        gr.Warning("nothing to regenerate yet: send a message first.")
        yield gr.skip(), gr.skip(), gr.skip(), count
        return
    count = int(count or 0) + 1
    s = Sampling(s.max_new_tokens, s.temperature, s.top_p, s.repetition_penalty, s.seed + count)
    for lh, rh, _ in chat_turn(holder, text, left0, right0, left_model, right_model, s):
        yield lh, rh, gr.skip(), count


def blind_turn(holder: engine.ModelHolder, text: str, history, adapter: str | None, s: Sampling, rng=random,
               against: str | None = None):
    """One blind turn of a conversation: yield (A chat, B chat, input box, mapping).  Both chats hold the shared
    conversation so far (the answers chosen at earlier votes) plus this turn's answer, base and tuned in
    random order; the mapping (with the rendered prompt of the whole conversation) comes with the last yield.
    ``against``: another loaded adapter answers instead of the base (a stage against its SFT start); A and B
    are then named by their adapters."""
    try:
        _check_prompt(holder, text, adapter)
        if against is not None and (against not in holder.adapters or against == adapter):
            raise engine.PlaygroundError(f"choose another loaded adapter than {adapter!r} to compare it with.")
        shared = plain(history)
        prompt = holder.render_chat(shared, text)
        order = [("base", None), ("tuned", adapter)] if against is None else [(against, against), (adapter, adapter)]
        rng.shuffle(order)
        texts = ["", ""]

        def chats():
            return tuple([*shared, {"role": "user", "content": text}, {"role": "assistant", "content": t}]
                         for t in texts)

        for i, (_, name) in enumerate(order):
            for piece in holder.stream_chat(shared, text, name, s):
                texts[i] = piece
                yield (*chats(), "", None)
        turn = sum(1 for m in shared if m["role"] == "user") + 1
        mapping = {"prompt": prompt, "run": holder.run.id, "adapter": adapter, "turn": turn,
                   "base_model": holder.run.config().model.base_model,
                   **({"against": against} if against is not None else {}),
                   "messages": [*shared, {"role": "user", "content": text}], "history": shared, "text": text,
                   "A": {"who": order[0][0], "text": texts[0]}, "B": {"who": order[1][0], "text": texts[1]}}
        yield (*chats(), "", mapping)
    except USER_ERRORS as e:
        gr.Warning(message(e))
        yield gr.skip(), gr.skip(), gr.skip(), None


def continue_with(mapping: dict | None, choice: str | None):
    """After a vote on a conversation turn: the shared conversation continues with the chosen answer (A on a
    tie) -> (shared history, A chat, B chat), or ``gr.skip()`` three times for a single-prompt pair."""
    if not mapping or "history" not in mapping or choice not in AB_CHOICES:
        return gr.skip(), gr.skip(), gr.skip()
    won = mapping["B"] if choice == "B" else mapping["A"]
    h = [*mapping["history"], {"role": "user", "content": mapping["text"]},
         {"role": "assistant", "content": won["text"]}]
    return h, h, h


def votes_run(holder: engine.ModelHolder, run_id: str | None) -> str | None:
    """The run the next votes are for: the loaded one (its answers are what is voted on), else the one chosen."""
    return holder.run.id if holder.run is not None and holder.model is not None else run_id


def pairs_count(store: RunStore, run_id: str | None) -> tuple[str, int]:
    """(the line saying how many pairs the run has, that count)."""
    from studio.votes import count_pairs

    if not run_id:
        return "No run loaded: load one and vote to collect preference pairs.", 0
    try:
        n = count_pairs(store.get(run_id))
    except USER_ERRORS as e:
        return f"⚠️ {message(e)}", 0
    return ((f"**{n} pair{'s' if n != 1 else ''} voted for run `{run_id}`**: train the run on them as a preference "
             "stage (DPO, ORPO or KTO)." if n else
             f"No votes for run `{run_id}` yet: each A or B vote is a preference pair to train it on."), n)


def pairs_update(store: RunStore, run_id: str | None):
    """-> (the run's pair count line, the "Train on these votes" button, enabled once it has a vote)."""
    text, n = pairs_count(store, run_id)
    return text, gr.Button(interactive=n > 0)


def votes_file():
    """A copy of the votes file to download (the studio home is not served), or None before the first vote."""
    import shutil
    import tempfile
    from pathlib import Path

    src = engine.preferences_path()
    if not src.is_file():
        return None
    dest = Path(tempfile.mkdtemp(prefix="studio-votes-")) / "preferences.jsonl"
    shutil.copyfile(src, dest)
    return str(dest)


def votes_note() -> str:
    p = engine.preferences_path()
    n = engine.tally()["total"]
    return (f"Votes are appended to `{p}` ({n} pair{'s' if n != 1 else ''}; one JSON object a line: "
            "prompt, chosen, rejected, ...).")


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
    pairs: gr.Markdown | None = None  # "N pairs voted for this run" (live)
    train_votes: gr.Button | None = None  # "Train on these votes": the Train tab's preference stage
    against: gr.Dropdown | None = None  # what the blind A/B pits the tuned adapter against


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

    with gr.Tab("Chat side by side"):
        with gr.Row():
            left_model = gr.Dropdown(choices=model_choices(holder), value=BASE, label="Left", elem_id="pg-left-model",
                                     info="base, the final adapter or a checkpoint")
            # Help on both sides, so the two pickers (and the chats under them) line up.
            right_model = gr.Dropdown(choices=model_choices(holder), value=holder.adapters[0] if holder.adapters
                                      else None, label="Right", elem_id="pg-right-model",
                                      info="answers the same message with the same settings")
        with gr.Row(equal_height=True):
            left_chat = gr.Chatbot(label="Left: base", height=380, elem_id="pg-left-chat",
                                   buttons=["copy"], feedback_options=None)
            right_chat = gr.Chatbot(label="Right: tuned", height=380, elem_id="pg-right-chat",
                                    buttons=["copy"], feedback_options=None)
        with gr.Row(equal_height=True):
            chat_input = gr.Textbox(show_label=False, placeholder="Message both models (Enter sends)", scale=4,
                                    elem_id="pg-chat-input", container=False)
            send_btn = gr.Button("Send", variant="primary", elem_id="pg-send", scale=0, min_width=90)
            regen_btn = gr.Button("Regenerate", elem_id="pg-regenerate", scale=0, min_width=120)
            clear_btn = gr.Button("Clear", elem_id="pg-clear", scale=0, min_width=80)
        gr.Markdown("Each side answers after its own earlier answers, with the run's template (or the model's chat "
                    "template) applied to the whole conversation, the same sampling and seed.")
        # Kept for API clients: one prompt, base and tuned answers (``/generate``) and a one-prompt pair (``/ab``).
        prompt = gr.Textbox(label="Prompt", lines=3, elem_id="pg-prompt", visible=False)
        gen_btn = gr.Button("Generate", elem_id="pg-generate", visible=False)
        base_out = gr.Textbox(label="Base model", interactive=False, elem_id="pg-base-out", visible=False)
        tuned_out = gr.Textbox(label="Tuned model", interactive=False, elem_id="pg-tuned-out", visible=False)
    with gr.Tab("Compare checkpoints"):
        prompts = gr.Textbox(first_prompts or "", label="Prompts (one per line)", lines=4, elem_id="pg-prompts",
                             info=f"One per line, at most {COMPARE_MAX_PROMPTS}; an example's input follows "
                                  f"'{INPUT_MARK.strip()}' on its line. Filled from the run's validation examples.")
        cmp_btn = gr.Button("Compare", elem_id="pg-compare")
        # Tall enough for a few wrapped answers side by side before the table scrolls inside itself.
        table = gr.Dataframe(headers=["prompt", "base", "final"], label="Answers", interactive=False, wrap=True,
                             column_widths=compare_widths(2), max_height=1000, elem_id="pg-compare-table")
    with gr.Tab("Blind A/B"):
        gr.Markdown("A conversation with the tuned model and the base (or the adapter chosen below) answering each "
                    "message in random order. Vote for the better answer: the conversation goes on from it, and the "
                    "pair is saved for preference training.")
        against = gr.Dropdown(choices=against_choices(holder), value=start_adapter(holder) or BASE,
                              label="Tuned adapter against", elem_id="pg-ab-against",
                              info="base, or another loaded adapter: a preference stage against the SFT adapter it "
                                   "started from")
        with gr.Row(equal_height=True):
            ab_chat_a = gr.Chatbot(label="Answer A", height=340, elem_id="pg-ab-chat-a", feedback_options=None,
                                   buttons=["copy"])
            ab_chat_b = gr.Chatbot(label="Answer B", height=340, elem_id="pg-ab-chat-b", feedback_options=None,
                                   buttons=["copy"])
        with gr.Row(equal_height=True):
            ab_input = gr.Textbox(show_label=False, placeholder="Message (Enter sends a blind pair)", scale=4,
                                  container=False, elem_id="pg-ab-input")
            # Wide enough that no label breaks onto two lines on a laptop screen.
            ab_btn = gr.Button("Send blind", variant="primary", elem_id="pg-ab-generate", scale=0, min_width=150)
            ab_clear = gr.Button("New conversation", elem_id="pg-ab-clear", scale=0, min_width=210)
        with gr.Row():
            ab_choice = gr.Radio(AB_CHOICES, value=None, label="Which answer is better?", elem_id="pg-ab-choice")
            vote_btn = gr.Button("Submit vote", elem_id="pg-vote", scale=0)
        ab_status = gr.Markdown(elem_id="pg-ab-status")
        session0 = {"tuned": 0, "base": 0, "tie": 0}
        tally = gr.Markdown(tally_text(session0), elem_id="pg-tally")
        pairs0, n0 = pairs_count(store, first_id)  # plain values: a component made here would be drawn here
        with gr.Row(equal_height=True):
            pairs_md = gr.Markdown(pairs0, elem_id="pg-pairs")
            train_votes = gr.Button("Train on these votes", variant="primary", elem_id="pg-train-votes", scale=0,
                                    min_width=200, interactive=n0 > 0)
        with gr.Row(equal_height=True):
            votes_md = gr.Markdown(votes_note(), elem_id="pg-votes-path")
            votes_dl = gr.DownloadButton("Download votes", value=votes_file(), elem_id="pg-votes-download",
                                         scale=0, min_width=200)
        ab_pair_btn = gr.Button("pair", visible=False, elem_id="pg-ab-pair")
        ab_a = gr.Textbox(label="Answer A", interactive=False, elem_id="pg-ab-a", visible=False)
        ab_b = gr.Textbox(label="Answer B", interactive=False, elem_id="pg-ab-b", visible=False)
    ab_history = gr.State([])  # the blind conversation as chosen so far (the server's copy)
    regen_count = gr.State(0)
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
    # The pair count (below) follows a run chosen in the same chain: two "always_last" listeners of one event
    # restart each other for ever (``tests/test_ui_events.py``).
    selected = run.change(on_select, run, [checkpoints, prompts], api_visibility="private")
    # A preference stage loads its starting adapter too: SFT on the left, the stage on the right, and the blind
    # A/B pits the stage against it.
    loaded = load_btn.click(on_load, [run, checkpoints], [status, adapter], api_name="load") \
        .then(lambda: (gr.Dropdown(choices=model_choices(holder), value=start_adapter(holder) or BASE),
                       gr.Dropdown(choices=model_choices(holder),
                                   value=holder.adapters[0] if holder.adapters else None),
                       gr.Dropdown(choices=against_choices(holder), value=start_adapter(holder) or BASE)),
              None, [left_model, right_model, against], api_visibility="private") \
        .then(lambda: compare_table({"headers": ["prompt", "base", *holder.adapters], "data": []}), None, table,
              api_visibility="private")  # the widths for the models now loaded (/compare answers plain values)
    gen_btn.click(on_generate, [prompt, adapter, *settings], [base_out, tuned_out], api_name="generate")
    prompt.submit(on_generate, [prompt, adapter, *settings], [base_out, tuned_out], api_visibility="private")
    cmp_btn.click(on_compare, [prompts, *settings], table, api_name="compare")
    ab_pair_btn.click(on_ab, [prompt, adapter, *settings], [ab_a, ab_b, ab_mapping], api_name="ab")

    def on_chat(text, left, right, lm, rm, *values):
        yield from chat_turn(holder, text, left, right, lm, rm, sampling(*values))

    def on_regen(left, right, lm, rm, count, *values):
        yield from regenerate(holder, left, right, lm, rm, sampling(*values), count)

    def on_blind(text, history, name, other, *values):
        yield from blind_turn(holder, text, history, name, sampling(*values), against=_adapter_of(other))

    chat_in = [chat_input, left_chat, right_chat, left_model, right_model, *settings]
    gr.on([send_btn.click, chat_input.submit], on_chat, chat_in, [left_chat, right_chat, chat_input],
          api_name="chat")
    regen_btn.click(on_regen, [left_chat, right_chat, left_model, right_model, regen_count, *settings],
                    [left_chat, right_chat, chat_input, regen_count], api_visibility="private")
    clear_btn.click(lambda: ([], [], 0), None, [left_chat, right_chat, regen_count], api_visibility="private")
    gr.on([left_model.change, right_model.change], lambda lm, rm: (gr.Chatbot(label=f"Left: {lm or '—'}"),
                                                                   gr.Chatbot(label=f"Right: {rm or '—'}")),
          [left_model, right_model], [left_chat, right_chat], api_visibility="private")
    gr.on([ab_btn.click, ab_input.submit], on_blind, [ab_input, ab_history, adapter, against, *settings],
          [ab_chat_a, ab_chat_b, ab_input, ab_mapping], api_visibility="private")
    ab_clear.click(lambda: ([], [], [], None, ""), None, [ab_history, ab_chat_a, ab_chat_b, ab_mapping, ab_status],
                   api_visibility="private")

    ab_next = gr.State(None)

    def stage(mapping, choice):
        return continue_with(mapping, choice)[0] if mapping and "history" in mapping else None

    def after_vote(next_history, mapping):
        moved = next_history is not None and mapping is None  # the vote was recorded (or a tie counted)
        chats = (next_history,) * 3 if moved else (gr.skip(),) * 3
        return (*chats, votes_note(), votes_file())

    # The conversation moves on from the chosen answer once the vote is in; /vote itself answers as before.
    voted = vote_btn.click(stage, [ab_mapping, ab_choice], ab_next, api_visibility="private") \
        .then(vote, [ab_choice, ab_mapping, session_tally], [tally, ab_status, ab_mapping, session_tally],
              api_name="vote") \
        .then(after_vote, [ab_next, ab_mapping], [ab_history, ab_chat_a, ab_chat_b, votes_md, votes_dl],
              api_visibility="private")
    # The pair count follows the run the votes are for: after a vote, a load, a choice of run.
    def on_pairs(run_id):
        return pairs_update(store, votes_run(holder, run_id))

    pairs_out = dict(fn=on_pairs, inputs=run, outputs=[pairs_md, train_votes], api_visibility="private",
                     show_progress="hidden")
    selected.then(**pairs_out, trigger_mode="always_last")
    loaded.then(**pairs_out)
    voted.then(**pairs_out)
    return PlaygroundUI(run, refresh, checkpoints, load_btn, status, adapter, max_new, temperature, top_p, rep, seed,
                        prompt, gen_btn, base_out, tuned_out, prompts, cmp_btn, table, ab_btn, ab_a, ab_b,
                        ab_choice, vote_btn, ab_status, tally, ab_mapping, session_tally, pairs_md, train_votes,
                        against)
