"""UI state from one place: the server-side draft, restored by one page-load handler, and the Train tab's
pre-Start summary computed from the very values Start sends.

Contract:
- ``wire(ctx, data_ui, presets_ui, train_ui)`` (inside the open ``gr.Blocks``, after every tab is built):
  every change of a Data or Presets value (the preset chosen included) writes ``studio.drafts`` and redraws
  the Train tab's summary; one page-load handler reads the draft and refills the Presets tab (the preset list
  read afresh, a loaded YAML shown by name), the Data tab (source, detected columns, mapping, template,
  lengths, split) and redraws the preview, the changes, the fit and the summary.  With no draft yet, the
  page keeps the defaults it was built with (the preset list still refreshed).
- An open page follows the draft live: a timer takes on a draft another browser saved (``follows``: newer
  than the one this page shows, and the person is not typing in a Data or Presets field), then redraws as on
  load.  A page saves only a draft that differs from the file's (``drafts.save_if_changed``), so taking one on
  writes nothing back; a page behind a newer draft saves its own edits on top of it (``keep_draft``), so two
  people editing different fields both keep theirs (the same field: the last edit wins).  Values the page read
  before it had drawn a draft it took on are not an edit and save nothing (``stale``); saves and takes of every
  page run one at a time.
- ``start_config(base, keys, values)`` is the one mapping Start and the summary share; ``summary`` states
  the preset and its changes, the data (file, template, mapping, train/validation counts) and every check
  that would refuse the run (values, data, this machine), before anything loads.
- Plain functions (``draft_of``, ``summary``, ``restore_values``) are tested without a browser.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import gradio as gr

from studio import drafts
from studio.config import ConfigError, RunConfig
from studio.data.files import DataError
from studio.security import SecurityError
from studio.ui import data as data_tab
from studio.ui import presets as presets_tab
from studio.ui.messages import USER_ERRORS, message
from studio.ui.widgets import get_value

DATA_SHOWN = ("data.template", "data.max_length")


def display(key: str, value):
    return presets_tab.display(key, value)


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return float(a) == float(b)
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    return a == b


def draft_of(preset: str | None, base: dict, keys: list[str], values: list) -> drafts.Draft:
    """The draft these widget values make: only the values that differ from the preset are kept."""
    try:
        cfg = RunConfig.from_dict(base)
    except (ConfigError, SecurityError):
        cfg = RunConfig()
    diff = {}
    for k, v in zip(keys, values):
        if not _same(display(k, get_value(cfg, k)), v if not isinstance(v, (list, tuple)) else ", ".join(v)):
            diff[k] = v
    return drafts.Draft(preset or "", base, diff)


def start_config(base: dict, keys: list[str], values: list) -> RunConfig:
    """The config Start trains on: ``train.config_for``, the very function ``train.start_run`` calls."""
    from studio.ui.train import config_for

    return config_for(base, keys, values)


def _checks(cfg: RunConfig) -> list[str]:
    """Every refusal Start would meet on this machine, each a sentence naming the key."""
    from studio.ui.train import check_data, check_machine

    problems = []
    try:
        check_data(cfg)
    except (DataError, ConfigError, SecurityError, ValueError, KeyError, OSError) as e:
        problems.append(message(e))
    try:
        check_machine(cfg)
    except (ConfigError, ValueError, RuntimeError) as e:
        problems.append(message(e))
    return problems


def _counts(cfg: RunConfig) -> str:
    d = cfg.data
    if not d.path:
        return "counted when the run loads the hub split"
    records = data_tab.read_source(d.path)
    val_records = data_tab.read_source(d.val_path) if d.val_path else None
    from studio.data.pipeline import select

    sel = select(d, records, val_records)
    n = len(sel.skipped)
    skip = f", {n} record{'s' if n != 1 else ''} skipped" if n else ""
    return f"**{len(sel.train)}** training and **{len(sel.validation)}** validation examples{skip}"


def _data_line(cfg: RunConfig) -> str:
    d = cfg.data
    if d.path:
        src = f"file **{Path(d.path).name}**"
    elif d.hub_dataset:
        src = f"hub dataset **{d.hub_dataset}** (split {d.split})"
    else:
        src = "**no data chosen**"
    val = f"; validation file **{Path(d.val_path).name}**" if d.val_path else ""
    mapping = ", ".join(f"{r} ← `{c}`" for r, c in d.mapping.items()) if d.mapping else "as detected"
    return f"- Data: {src}{val}; columns {mapping}"


def summary(preset: str | None, base: dict, keys: list[str], values: list) -> str:
    """Markdown: what Start would train on, and what would stop it."""
    label = preset or "(no preset)"
    try:
        before = RunConfig.from_dict(base)
        cfg = start_config(base, keys, values)
    except (ConfigError, SecurityError, ValueError, TypeError) as e:
        return (f"### Start would train\n- Preset **{label}**\n\n❌ **Start would refuse:** {message(e)}\n\n"
                "Fix the value on the Data or Presets tab.")
    changed = [f"`{k}` {presets_tab.shown(display(k, get_value(before, k)))} → "
               f"{presets_tab.shown(display(k, get_value(cfg, k)))}"
               for k in presets_tab.KEYS if get_value(before, k) != get_value(cfg, k)]
    lines = ["### Start would train",
             f"- Preset **{label}** with " + (f"{len(changed)} change{'s' if len(changed) != 1 else ''}: "
                                              + "; ".join(changed) if changed else "no changes"),
             f"- Model `{cfg.model.base_model}`",
             _data_line(cfg),
             f"- Template **{cfg.data.template}**, max length {cfg.data.max_length} tokens"
             + (", loss on prompts too" if cfg.data.train_on_inputs else "")]
    try:
        lines.append(f"- Examples: {_counts(cfg)}")
    except USER_ERRORS as e:
        lines.append(f"- Examples: not countable ({message(e)})")
    problems = _checks(cfg)
    if problems:
        lines.append("\n❌ **Start would refuse:**\n" + "\n".join(f"- {p}" for p in dict.fromkeys(problems)))
    else:
        lines.append("\n✅ The checks Start makes pass on this machine.")
    return "\n".join(lines)


# ---- restore ------------------------------------------------------------------------------------

def restore_values(draft: drafts.Draft, keys: list[str]) -> list:
    """Each key's value as its widget shows it: the draft's, else the base preset's."""
    try:
        cfg = RunConfig.from_dict(draft.base)
    except (ConfigError, SecurityError):
        cfg = RunConfig()
    return [draft.values[k] if k in draft.values else display(k, get_value(cfg, k)) for k in keys]


def preset_choices(current: str | None) -> list:
    """The preset list, read afresh; a preset label that is not a saved name (a loaded YAML) is kept."""
    choices = list(presets_tab.list_presets())
    if current and current not in choices:
        return [*choices, (current, current)]
    return choices


def preset_dropdown(current: str | None, **value):
    """The preset list read afresh.  It takes a value that has just left the list: a save already queued when
    "Save preset" (or another browser) replaced a loaded YAML's label must not fail with Gradio's "not in the
    list of choices"; ``presets.choose_preset`` answers a name it does not know with a message."""
    return gr.Dropdown(choices=preset_choices(current), allow_custom_value=True, **value)


def wire(ctx, data_ui, presets_ui, train_ui) -> None:
    keys = list(presets_ui.keys) + list(data_ui.keys)
    inputs = list(presets_ui.inputs) + list(data_ui.inputs)

    # The draft this page shows: the version on disk it last took on, and its own values as last saved.
    seen = gr.State({})
    # How many drafts the page has taken on, as the page itself holds it, so an event carries it with the widget
    # values it read.  The server's ``seen`` and the preset's base move as soon as a take is sent, the widgets
    # only once the page has drawn it: values read before then are not an edit (``stale``).  Set by a step
    # after the take, so it never runs ahead of the widgets; "hidden" keeps it in the page, firing its change.
    took = gr.Number(0, precision=0, visible="hidden", interactive=False, elem_id="draft-took")

    def persist(preset, base, shown, took_now, *values):
        if stale(shown, took_now):
            return gr.skip(), gr.skip()  # the page is drawing a draft it took on; the token's change comes next
        text = summary(preset, base, keys, list(values))
        try:
            return text, keep_draft(shown, draft_of(preset, base, keys, list(values)))
        except OSError as e:
            return text + f"\n\n⚠️ Your choices could not be kept: {e}", gr.skip()

    # A model id is looked up (its tokenizer, its shape) when the summary is drawn: a Presets text box is kept when
    # it is left or submitted, not at every keystroke of a half-typed id, after the Presets tab's own panels took
    # it on (``presets_ui.committed``): a second "always_last" listener of the box's events would restart those
    # for ever.  Every save queues as one (``concurrency_id``), across pages too, so a page's read of the draft,
    # merge and write never interleave with another's.
    text_keys = {k for k in presets_tab.TEXT_KEYS}
    triggers = [c.change for k, c in zip(keys, inputs) if k not in text_keys]
    triggers += [presets_ui.base.change, presets_ui.preset.change, took.change]
    saving = dict(fn=persist, inputs=[presets_ui.preset, presets_ui.base, seen, took, *inputs],
                  outputs=[train_ui.summary, seen], api_visibility="private", trigger_mode="always_last",
                  show_progress="hidden", concurrency_id="draft")
    gr.on(triggers, **saving)
    presets_ui.committed.then(**saving)

    roles = list(data_ui.role_dropdowns.values())
    restored = [presets_ui.preset, presets_ui.base, presets_ui.description, *inputs, *roles, data_ui.detected,
                data_ui.schema, data_ui.source, data_ui.sample, data_ui.template_text, data_ui.base_model]
    n_rest = len(restored) - 1

    def untouched():
        return (preset_dropdown(None), *([gr.skip()] * n_rest))

    def restore():
        now = drafts.stamp()  # read before the draft: a save in between shows as newer at the next tick
        draft = drafts.load()
        page = {"stamp": now, "page": new_page_id(), "took": 0}  # a reload is a new page: it takes on what it shows
        if draft is None:
            return (*untouched(), page)
        try:
            return (*restored_from(draft), taken_on(draft, now, page))
        except Exception:  # noqa: BLE001 - a draft from another version must never break the page: start afresh
            return (*untouched(), page)

    def restored_from(draft):
        vals = restore_values(draft, keys)
        v = dict(zip(keys, vals))
        try:
            cfg = RunConfig.from_dict(draft.base)
        except (ConfigError, SecurityError):
            cfg = RunConfig()
        path = v.get("data.path") or ""
        schema, *rest = data_tab.load_source(path, v.get("data.hub_dataset", ""), v.get("data.hub_config", ""),
                                             v.get("data.split", "train"))
        role_upds, detected = rest[:5], rest[5]
        mapping = v.get("data.mapping") or {}
        shown_roles = [gr.update(choices=u["choices"], value=(mapping or detected).get(r, ""))
                       for r, u in zip(data_tab.ROLE_ORDER, role_upds)]
        custom = v.get("data.template") == "custom"
        widget_vals = []
        for k, val in zip(keys, vals):
            if k in ("data.custom_prompt", "data.custom_response"):
                widget_vals.append(gr.update(value=val, visible=custom))
            else:
                widget_vals.append(val)
        samples = data_tab.sample_files()
        tmpl = data_tab.template_changed(v.get("data.template", "alpaca"), v.get("data.custom_prompt", ""),
                                         v.get("data.custom_response", "{response}"))[0]
        return (preset_dropdown(draft.preset, value=draft.preset or None), draft.base,
                presets_tab.describe_preset(cfg), *widget_vals, *shown_roles, detected, schema,
                data_tab.source_label(path, v.get("data.hub_dataset", ""), v.get("data.hub_config", ""),
                                      v.get("data.split", "train")),
                path if path in samples.values() else None, tmpl,
                v.get("model.base_model", cfg.model.base_model))

    state_in = [presets_ui.base, *presets_ui.inputs]

    def redraw(dep, **kw):
        """After the widgets took a draft: the page's token, then the preview, the changes, the fit and the summary,
        drawn afresh."""
        # "always_last": a token step skipped while another runs would leave the page a take behind, saving nothing.
        return dep.then(lambda shown: (shown or {}).get("took", 0), seen, took, api_visibility="private",
                        trigger_mode="always_last", **{**kw, "show_progress": "hidden"}) \
            .then(data_tab.refresh, data_ui.preview_inputs, data_ui.preview_outputs, api_visibility="private", **kw) \
            .then(presets_tab.changes, state_in, presets_ui.changes, api_visibility="private", **kw) \
            .then(presets_tab.fit, state_in, [presets_ui.fit_table, presets_ui.fit_verdict, presets_ui.plan_table],
                  api_visibility="private", **kw) \
            .then(lambda p, b, *vals: summary(p, b, keys, list(vals)), [presets_ui.preset, presets_ui.base, *inputs],
                  train_ui.summary, api_visibility="private", **kw)

    redraw(gr.on(None, restore, None, [*restored, seen], api_visibility="private"))

    # An open page follows edits made in another browser: a timer compares the draft's version with the one this
    # page shows and takes the newer draft on, unless the person is typing in a Data or Presets field (their
    # half-typed value would be replaced; the draft is taken on once they leave it).
    editing = gr.Checkbox(False, visible=False, elem_id="draft-editing")
    taken = gr.State(0)  # counts the drafts taken on: its change starts the redraw, so an idle tick draws nothing
    timer = gr.Timer(DRAFT_EVERY_S)

    def follow(shown, busy, count):
        now = drafts.stamp()
        skip_all = (*([gr.skip()] * len(restored)), gr.skip(), gr.skip())
        if not follows((shown or {}).get("stamp"), now, busy):
            return skip_all
        draft = drafts.load()
        if draft is None or draft.by == (shown or {}).get("page"):
            return skip_all  # none, or this page's own save: its widgets are already as new
        try:
            out = restored_from(draft)
        except Exception:  # noqa: BLE001 - as on load: a foreign draft leaves the page as it is
            return (*([gr.skip()] * len(restored)), {**(shown or {}), "stamp": now}, gr.skip())
        return (*out, taken_on(draft, now, shown), int(count or 0) + 1)  # the redraw moves the token on

    # In the saves' queue: a take and a save of this page never both rewrite ``seen`` (the later would undo the
    # other), and a take never reads the draft halfway through another page's merge.
    timer.tick(follow, [seen, editing, taken], [*restored, seen, taken], js=EDITING_JS, api_visibility="private",
               show_progress="hidden", concurrency_id="draft")
    redraw(taken.change(lambda: None, None, None, api_visibility="private", show_progress="hidden"),
           show_progress="hidden")


DRAFT_EVERY_S = 2.0
# Sent with each tick: whether the focus is in a text or number field of the Data or Presets tab.  The page
# counts its ticks (window.__draftTicks), so a browser test can wait for ticks instead of sleeping.
EDITING_JS = """(shown, editing, count) => {
  window.__draftTicks = (window.__draftTicks || 0) + 1;
  const el = document.activeElement;
  const busy = !!el && el.matches("input, textarea") && !!el.closest("[id^='data-'], [id^='presets-']");
  return [shown, busy, count];
}"""


def new_page_id() -> str:
    return uuid.uuid4().hex


def keep_draft(shown: dict | None, mine: drafts.Draft) -> dict:
    """Save a page's draft -> what the page now shows (its ``seen`` state: ``stamp`` of the version on disk it
    took on, ``body`` its own values as last saved or taken on, ``page`` its id, ``took`` how many drafts it took
    on).  When another page saved a newer draft since this page took one on, this page's edits since then go on
    top of it (``drafts.merge``) and the page stays behind, so its next tick takes the merged draft on.  A page
    that has not restored the draft yet (no ``page`` id) saves nothing: a change event before its restore must
    not put defaults back."""
    shown = shown or {}
    me = shown.get("page")
    if not me:  # the page has not restored the draft yet: its widgets still hold the defaults it was built with
        return shown
    mine = dataclasses.replace(mine, by=me)
    before = shown.get("body")
    if before is not None and shown.get("stamp") != drafts.stamp():
        theirs = drafts.load()
        if theirs is not None and theirs.by != me:
            # Saved as nobody's: every page takes the merged draft on, this one included.
            drafts.save_if_changed(dataclasses.replace(drafts.merge(theirs, drafts.from_dict(before), mine), by=""))
            return {**shown, "body": drafts.as_dict(mine)}
    drafts.save_if_changed(mine)
    return {**shown, "stamp": drafts.stamp(), "body": drafts.as_dict(mine)}


def stale(shown: dict | None, took_now) -> bool:
    """Whether widget values read with the page's token ``took_now`` predate the last draft the page took on:
    then they are what the page showed before (or a mix while it draws the new one), not an edit, and measured
    against the new base and version they would put the old values back on top of the draft taken on."""
    return int(took_now or 0) != int((shown or {}).get("took") or 0)


def taken_on(draft: drafts.Draft, now: str, shown: dict | None) -> dict:
    """The ``seen`` state of a page that shows ``draft`` (version ``now``): one more draft taken on."""
    shown = shown or {}
    return {"stamp": now, "body": drafts.as_dict(draft), "page": shown.get("page") or new_page_id(),
            "took": int(shown.get("took") or 0) + 1}


def follows(shown: str | None, now: str, editing: bool) -> bool:
    """Whether a page takes on the draft on disk: there is one, it is not the version the page shows, and the
    person is not typing in a field it would overwrite."""
    return bool(now) and now != (shown or "") and not editing


# ---- live lists ---------------------------------------------------------------------------------

LISTS_EVERY_S = 2.0


def run_list_updates(store, pickers: list, currents: list, shown: dict | None):
    """For each (name, keep) picker: a new dropdown when its runs (ids or statuses) changed since ``shown``,
    else ``gr.skip()``; the current choice is kept while its run is listed.  -> (*updates, shown)."""
    from studio.ui.run_picker import refresh_runs, run_choices

    shown = dict(shown or {})
    out = []
    for (name, keep), current in zip(pickers, currents):
        choices = [list(c) for c in run_choices(store, keep)]
        if shown.get(name) == choices:
            out.append(gr.skip())
            continue
        shown[name] = choices
        out.append(refresh_runs(store, current, keep))
    return (*out, shown)


def checkpoint_update(store, run_id: str | None, chosen: list | None, shown: list | None):
    """The Playground's checkpoint choices as the run's folder holds them now (a deleted checkpoint leaves
    the list and the selection), or ``gr.skip()`` when unchanged.  -> (update, names)."""
    from studio.ui.messages import USER_ERRORS

    try:
        names = [p.name for p in store.get(run_id).checkpoints()] if run_id else []
    except USER_ERRORS:
        names = []
    if shown is not None and names == shown:
        return gr.skip(), names
    return gr.CheckboxGroup(choices=names, value=[c for c in chosen or [] if c in names]), names


def follow_lists(ctx, playground_ui, evaluate_ui, export_ui) -> None:
    """One timer keeps the run lists of the Playground, Evaluate and Export tabs (and the Playground's
    checkpoints) as the runs folder holds them: a run that finished appears with its new status, a deleted
    one leaves; nothing is redrawn while nothing changed, so an open list is not disturbed."""
    from studio.ui.run_picker import has_adapter, has_weights

    store = ctx.store
    pickers = [("pg", has_weights), ("eval", has_adapter), ("export", has_adapter)]
    runs = [playground_ui.run, evaluate_ui.run, export_ui.run]
    shown = gr.State({})
    cks_shown = gr.State(None)
    timer = gr.Timer(LISTS_EVERY_S)

    def tick(shown_runs, shown_cks, pg_run, pg_cks, *currents):
        *updates, shown_runs = run_list_updates(store, pickers, list(currents), shown_runs)
        ck, names = checkpoint_update(store, pg_run, pg_cks, shown_cks)
        return (*updates, shown_runs, ck, names)

    timer.tick(tick, [shown, cks_shown, playground_ui.run, playground_ui.checkpoints, *runs],
               [*runs, shown, playground_ui.checkpoints, cks_shown], api_visibility="private",
               show_progress="hidden")
