"""The Train tab's preference stage: DPO, ORPO or KTO on a finished run's votes, started from the browser.

Contract:
- ``build(ctx) -> StageUI`` lays out a collapsed accordion inside the Train tab: the parent run and the adapter
  it starts from (final or a checkpoint), the method, a stage preset (``studio.votes.stage_presets``) with its
  key fields (beta, learning rate, epochs) editable, the pairs (the studio's votes for the run, or an uploaded
  ``prompt/chosen/rejected`` or ``prompt/completion/label`` file, or a Hub dataset), and before Start a
  summary: how many pairs, what the stage would run, the fit estimate (``studio.votes.stage_estimate``), or
  the refusal naming the file, line and field.  ``wire(train_ui, stage_ui, store)`` connects its Start to the
  Train tab: Start launches the stage through ``studio.votes.start_stage`` (the same worker as training) and
  hands the new run to the Train tab's "Run shown", whose live chart draws the stage's preference metrics.
- ``link_playground(playground_ui, stage_ui, tabs)``: the Playground's "Train on these votes" opens this
  section on the Train tab with that run chosen and its votes as the pairs.
- The handlers are plain functions of the store and the widget values (``parent_choices``,
  ``checkpoint_choices``, ``default_preset``, ``preset_fields``, ``plan``, ``start``), testable without a
  browser; every engine error comes back as a message, never a traceback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gradio as gr

from studio import votes
from studio.config import PREFER_METHODS, ConfigError, RunConfig, field_specs
from studio.data.files import DataError
from studio.runs import RunStore
from studio.ui.messages import USER_ERRORS, message
from studio.ui.run_picker import has_weights, run_choices
from studio.ui.widgets import bounded_info, short_help

VOTES, FILE, HUB = "the studio's votes for this run", "an uploaded file", "a Hub dataset"
SOURCES = [VOTES, FILE, HUB]
FIELDS = ("prefer.beta", "prefer.learning_rate", "prefer.epochs")  # the ones a person tunes most
_TOKENIZERS: dict = {}  # base model -> tokenizer (or None when it cannot be read): the summary is drawn often


# ---- plain functions ----------------------------------------------------------------------------

def parent_choices(store: RunStore) -> list[tuple[str, str]]:
    """Runs with a final adapter or a checkpoint (preference stages too: stages stack), newest first."""
    return run_choices(store, has_weights)


def checkpoint_choices(store: RunStore, run_id: str | None) -> list[tuple[str, int]]:
    """(label, step) of each adapter a stage can start from: the final one (step 0), then the checkpoints."""
    if not run_id:
        return []
    run = store.get(run_id)
    out = [("final adapter", 0)] if run.has_adapter() else []
    return out + [(f"checkpoint {p.name.split('-')[-1]}", int(p.name.split("-")[-1])) for p in run.checkpoints()]


def default_preset(cfg: RunConfig, method: str = "dpo") -> str:
    """The shipped stage preset for ``method`` that suits the parent: the tiny one for the offline demo's model
    (seconds on a CPU), else the Mistral-7B one; any preset of the method when neither exists."""
    names = [n for n, path in votes.stage_presets().items() if n.startswith(f"{method}-")]
    tiny = "tiny" in cfg.model.base_model
    for n in names:
        if ("tiny" in n) == tiny:
            return n
    return names[0] if names else ""


def preset_fields(name: str) -> tuple[str, float, float, float]:
    """(method, beta, learning rate, epochs) of a stage preset."""
    p = votes.load_stage_preset(name).prefer if name else RunConfig().prefer
    return p.method, p.beta, p.learning_rate, p.epochs


def overrides(beta, learning_rate, epochs, source: str = VOTES, hub: str | None = None) -> dict:
    out = hub_override(source, hub)
    for key, v in zip(FIELDS, (beta, learning_rate, epochs)):
        if v is not None and v != "":
            out[key] = float(v)
    return out


def _tokenizer(cfg: RunConfig):
    """The run's tokenizer, to check prompt lengths before Start; None when it cannot be read here (the worker
    checks them again and says so)."""
    key = cfg.model.base_model
    if key not in _TOKENIZERS:
        from studio.modeling import load_tokenizer

        try:
            _TOKENIZERS[key] = load_tokenizer(cfg)
        except Exception:  # noqa: BLE001 - offline without the model's files: lengths are checked at Start
            _TOKENIZERS[key] = None
    return _TOKENIZERS[key]


def known_preset(name: str | None) -> str:
    """A stage preset by name only: the browser (or an API client) never names a file of the server."""
    if name and name not in votes.stage_presets():
        raise ConfigError("preset", f"no preference-stage preset {name!r}; known: {', '.join(votes.stage_presets())}.")
    return name or ""


def votes_file(source: str, path: str | None) -> str:
    if source != FILE:
        return ""
    if not path:
        raise DataError("prefer.votes: no file uploaded yet; upload a prompt/chosen/rejected file (JSONL, "
                        "JSON, CSV or Parquet), or train on the studio's votes.")
    return path


def hub_override(source: str, hub: str | None) -> dict:
    """``prefer.hub_dataset`` for a Hub source: an id, never a folder of the server unless the operator allowed it."""
    from studio.security import local_dataset

    if source != HUB:
        return {}
    hub = (hub or "").strip()
    if not hub:
        raise DataError("prefer.hub_dataset: name a Hub preference dataset (owner/name, with prompt, chosen and "
                        "rejected columns), or train on the studio's votes.")
    local_dataset(hub, "prefer.hub_dataset")
    return {"prefer.hub_dataset": hub}


def fit_text(cfg: RunConfig) -> str:
    from studio.hardware import detect
    from studio.speed.profiles import PROFILES

    est = votes.stage_estimate(cfg)
    if est is None:
        return f"Fit: the shape of {cfg.model.base_model} is unknown offline, so its memory cannot be estimated."
    fits = [g for g, hw in PROFILES.items() if est.fits(hw.total_bytes / 2**30)]
    hw = detect()
    here = (f"this GPU ({hw.name}, {hw.total_gib:.0f} GiB): {'fits' if est.fits(hw.total_gib) else 'does not fit'}"
            if hw.device == "cuda" else "this machine has no GPU: the stage trains on the CPU")
    where = f"fits {', '.join(fits)}" if fits else "fits none of the GPUs listed (T4 to H200)"
    return (f"Fit: estimated peak ≈ **{est.total_gib:.2f} GiB** allocated, ≈ {est.reserved_gib():.1f} GiB reserved "
            f"({', '.join(f'{k} {v / 2**30:.2f} GiB' for k, v in est.parts.items() if v >= est.total / 50)}); "
            f"{where}; {here}.")


def plan(store: RunStore, parent_id: str | None, checkpoint, method: str, preset: str, source: str,
         path: str | None, beta, learning_rate, epochs, hub: str | None = None) -> tuple[bool, str]:
    """What Start would train, checked as Start checks it -> (ready, markdown): the pairs, the loop, the fit, or
    the refusal (the file, line and field) of Start itself."""
    if not parent_id:
        return False, "Choose a finished run to train on its votes."
    try:
        parent = store.get(parent_id)
        cfg = votes.stage_config(parent, method, int(checkpoint or 0), votes_file(source, path), known_preset(preset),
                                 overrides(beta, learning_rate, epochs, source, hub))
        pairs = votes.load_pairs(cfg, parent, tokenizer=_tokenizer(cfg))
    except USER_ERRORS as e:
        return False, f"⚠️ {message(e)}"
    p = cfg.prefer
    n = len(pairs.pairs)
    unit = "answers" if pairs.kind == "single" else "pairs"
    rows = (n - p.val_pairs) * (2 if p.method == "kto" and pairs.kind == "pairs" else 1)
    per_epoch = math.ceil(rows / (p.batch_size * p.grad_accum))
    steps = p.max_steps or math.ceil(per_epoch * p.epochs)
    start = f"checkpoint {p.parent_checkpoint}" if p.parent_checkpoint else "its final adapter"
    src = {VOTES: f"the studio's votes for run `{parent.id}`", HUB: f"Hub dataset `{p.hub_dataset}`"}.get(
        source, f"`{pairs.source}`")
    left = f" ({pairs.left_out} votes on other runs left out)" if pairs.left_out else ""
    lines = [f"**{n} {unit}** from {src}{left}; at least {p.min_pairs} needed.",
             f"**{p.method.upper()}** on run `{parent.id}` from {start} (also the reference, as a frozen copy)."
             if p.method in ("dpo", "kto") else f"**{p.method.upper()}** on run `{parent.id}` from {start} "
                                                 "(no reference model).",
             f"beta {p.beta:g} · learning rate {p.learning_rate:g} · {p.epochs:g} epochs · batch {p.batch_size} × "
             f"accumulation {p.grad_accum} · max length {p.max_length} → about {steps} optimizer steps.",
             fit_text(cfg)]
    return True, "\n\n".join(lines)


def start(store: RunStore, parent_id: str | None, checkpoint, method: str, preset: str, source: str,
          path: str | None, beta, learning_rate, epochs, hub: str | None = None) -> tuple[str | None, str]:
    """Launch the stage through the training worker -> (new run id or None, message)."""
    if not parent_id:
        return None, "⚠️ choose the run whose votes to train on."
    try:
        parent = store.get(parent_id)
        run = votes.start_stage(parent, method, int(checkpoint or 0), votes_file(source, path), known_preset(preset),
                                overrides(beta, learning_rate, epochs, source, hub), store=store)
    except USER_ERRORS as e:
        return None, f"⚠️ {message(e)}"
    p = run.config().prefer
    return run.id, (f"Started {p.method.upper()} stage `{run.id}` on run `{parent.id}`: it trains in the background; "
                    "the chart below follows it.")


def store_votes_upload(file) -> str:
    """An uploaded pairs file, kept under the studio's uploads like a data upload -> its path."""
    from studio.ui.data import check_data_path, store_upload

    return str(check_data_path(str(store_upload(file))))


# ---- the section --------------------------------------------------------------------------------

@dataclass
class StageUI:
    accordion: gr.Accordion
    parent: gr.Dropdown
    checkpoint: gr.Dropdown
    method: gr.Radio
    preset: gr.Dropdown
    beta: gr.Number
    learning_rate: gr.Number
    epochs: gr.Number
    source: gr.Radio
    upload: gr.File
    path: gr.State
    hub: gr.Textbox
    summary: gr.Markdown
    start: gr.Button
    message: gr.Markdown

    @property
    def inputs(self) -> list:
        return [self.parent, self.checkpoint, self.method, self.preset, self.source, self.path, self.beta,
                self.learning_rate, self.epochs, self.hub]


def _number(key: str, value, elem_id: str) -> gr.Number:
    f = field_specs()[key].metadata
    return gr.Number(value=value, label=key.split(".")[-1].replace("_", " "), elem_id=elem_id,
                     info=bounded_info(short_help(f.get("help")), f.get("min"), f.get("max")))


def build(ctx) -> StageUI:
    method0, beta0, lr0, epochs0 = preset_fields("")
    with gr.Accordion("Preference stage: DPO, ORPO or KTO on a finished run's votes", open=False,
                      elem_id="stage") as accordion:
        gr.Markdown("Trains the run's adapter further on pairs of answers where one was preferred (the Playground's "
                    "blind votes, or your file). A new run: the chart below follows it; compare it with the run it "
                    "started from in the Playground.")
        with gr.Row():
            parent = gr.Dropdown(choices=[], value=None, label="Run", allow_custom_value=True, elem_id="stage-parent",
                                 info="A finished run (or a stage: stages stack).", scale=3)
            checkpoint = gr.Dropdown(choices=[], value=None, label="Start from", elem_id="stage-checkpoint", scale=2,
                                     info="Its final adapter or a checkpoint; also DPO's and KTO's reference.")
            method = gr.Radio(list(PREFER_METHODS), value=method0, label="Method", elem_id="stage-method", scale=2,
                              info="dpo, orpo: pairs; kto: answers marked good or bad.")
        with gr.Row():
            preset = gr.Dropdown(choices=list(votes.stage_presets()), value=None, label="Stage preset",
                                 elem_id="stage-preset", info="Fills the fields beside it.", scale=2)
            beta = _number("prefer.beta", beta0, "stage-beta")
            learning_rate = _number("prefer.learning_rate", lr0, "stage-learning-rate")
            epochs = _number("prefer.epochs", epochs0, "stage-epochs")
        with gr.Row(equal_height=True):
            source = gr.Radio(SOURCES, value=VOTES, label="Pairs", elem_id="stage-source", scale=2)
            upload = gr.File(label="prompt/chosen/rejected file (kto: prompt/completion/label)", type="filepath",
                             file_types=[".jsonl", ".json", ".csv", ".parquet"], elem_id="stage-upload", height=140,
                             scale=2)
            hub = gr.Textbox(label="Hub dataset", placeholder="owner/name", elem_id="stage-hub", scale=2,
                             info="prompt, chosen and rejected text columns (its train split).")
        path = gr.State(None)
        summary = gr.Markdown("Choose a finished run to train on its votes.", elem_id="stage-summary")
        with gr.Row():
            start_btn = gr.Button("Start preference stage", variant="primary", elem_id="stage-start", scale=0,
                                  min_width=280)
            msg = gr.Markdown(elem_id="stage-message")
    ui = StageUI(accordion, parent, checkpoint, method, preset, beta, learning_rate, epochs, source, upload, path,
                 hub, summary, start_btn, msg)
    store = ctx.store

    def on_plan(*values):
        return plan(store, *values)[1]

    def draw(event):
        event(on_plan, ui.inputs, summary, api_visibility="private", show_progress="minimal")

    # Opening the section picks up runs that finished since the page loaded (what was chosen stays).
    accordion.expand(lambda cur: on_expand(store, cur), parent,
                     [parent, checkpoint, preset, method, beta, learning_rate, epochs, source],
                     api_visibility="private").then(on_plan, ui.inputs, summary, api_visibility="private")
    draw(parent.input(lambda rid: for_run(store, rid, keep_source=True), parent,
                      [parent, checkpoint, preset, method, beta, learning_rate, epochs, source],
                      api_visibility="private").then)
    draw(preset.input(lambda name: preset_fields(name) if name else (gr.skip(),) * 4, preset,
                      [method, beta, learning_rate, epochs], api_visibility="private").then)

    def on_method(rid, m):
        try:
            name = default_preset(store.get(rid).config(), m) if rid else ""
        except USER_ERRORS:
            name = ""
        fields = preset_fields(name)[1:] if name else (gr.skip(),) * 3
        return name or gr.skip(), *fields

    draw(method.input(on_method, [parent, method], [preset, beta, learning_rate, epochs],
                      api_visibility="private").then)

    def on_upload(file):
        try:
            return store_votes_upload(file), FILE
        except USER_ERRORS as e:
            gr.Warning(f"The file was refused: {message(e)}")
            return None, gr.skip()

    draw(upload.upload(on_upload, upload, [path, source], api_visibility="private").then)
    # Typing a Hub id picks that source; its summary comes when the box is left (the dataset is read then).
    hub.input(lambda v: HUB if (v or "").strip() else gr.skip(), hub, source, api_visibility="private",
              show_progress="hidden")
    gr.on([checkpoint.input, source.input, beta.blur, beta.submit, learning_rate.blur, learning_rate.submit,
           epochs.blur, epochs.submit, hub.blur, hub.submit], on_plan, ui.inputs, summary, api_visibility="private",
          show_progress="minimal")
    return ui


def for_run(store: RunStore, run_id: str | None, keep_source: bool = False):
    """The section set up for a run: (run choice, start choices, preset, method, beta, lr, epochs, source);
    the newest run when none is named."""
    choices = parent_choices(store)
    ids = [v for _, v in choices]
    rid = run_id if run_id in ids else (ids[0] if ids else None)
    try:
        cks = checkpoint_choices(store, rid)
        name = default_preset(store.get(rid).config()) if rid else ""
    except USER_ERRORS:
        cks, name = [], ""
    fields = preset_fields(name) if name else (gr.skip(),) * 4
    return (gr.Dropdown(choices=choices, value=rid), gr.Dropdown(choices=cks, value=cks[0][1] if cks else None),
            gr.Dropdown(value=name or None), *fields, gr.skip() if keep_source else VOTES)


def on_expand(store: RunStore, current: str | None):
    """The run list refreshed, the rest kept; the newest run set up when none is chosen yet."""
    choices = parent_choices(store)
    if current and current in [v for _, v in choices]:
        return (gr.Dropdown(choices=choices), *(gr.skip(),) * 7)
    return for_run(store, None)


def wire(train_ui, ui: StageUI, store: RunStore) -> None:
    """Start: launch the stage, then show it in the Train tab (its chart, log, status) and fold the section."""
    def on_start(session, *values):
        from studio.ui.train import _session

        rid, msg = start(store, *values)
        if rid is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), msg
        s = _session(session)
        s["live"].append(rid)  # its ending is announced even if it fails before the next tick
        return rid, msg, s, gr.Accordion(open=False), ""

    ui.start.click(on_start, [train_ui.session, *ui.inputs],
                   [train_ui.run, train_ui.message, train_ui.session, ui.accordion, ui.message], api_name="prefer")


def link_playground(playground_ui, ui: StageUI, tabs, ctx) -> None:
    """The Playground's "Train on these votes": the Train tab, this section open, that run and its votes chosen."""
    from studio.ui.playground import votes_run

    store = ctx.store

    def go(run_id):
        return (gr.Tabs(selected="train"), gr.Accordion(open=True), *for_run(store, votes_run(ctx.holder, run_id)))

    playground_ui.train_votes.click(
        go, playground_ui.run,
        [tabs, ui.accordion, ui.parent, ui.checkpoint, ui.preset, ui.method, ui.beta, ui.learning_rate, ui.epochs,
         ui.source], api_visibility="private") \
        .then(lambda *v: plan(store, *v)[1], ui.inputs, ui.summary, api_visibility="private")
