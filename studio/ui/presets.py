"""The Presets tab: every hyperparameter of a run in a typed widget, what changed, and whether it fits.

Contract: ``build(ctx) -> PresetsUI``, callable inside an open ``gr.Blocks``.
- ``PresetsUI.keys``/``inputs`` cover every ``model.*``, ``lora.*``, ``train.*``, ``speed.*`` and ``output.*``
  key, in the same order; ``PresetsUI.base`` (a ``gr.State``) holds the chosen preset's ``RunConfig.to_dict()``,
  the base the Train tab passes to ``widgets.to_config``.  Choosing a preset (or loading a YAML) refills every
  widget; the list is read afresh on every page load (``studio.ui.state``) and after a save, a loaded YAML shows in it
  by its file name, and a saved preset becomes the base the changes are measured from.
- Each section shows first what most runs set; its speed, memory and GPU-only switches sit in a closed
  accordion; help is one sentence.
- The changes panel lists each key whose value differs from the preset: ``key: preset value → new value``.
- "How it runs here, and will it fit" shows the speed plan for this machine (``studio.speed``: each part, what
  runs, why) and a table whose first row is this machine (its GPU, or "CPU only" with the estimate against its
  RAM) and then the common GPUs of ``studio.speed.profiles``, each with the planner's choice there and its
  estimated peak (``studio.estimate``), or what to change; served as ``api_name="estimate"``.  When the model's
  shape cannot be known offline, it says so.
- Saving writes a user preset (``studio.presets.save_preset``); its data section is the base preset's.
- An edit redraws the changes, then the fit, in one chain per kind of edit (a number or choice as it changes, a
  text box when left or submitted).  ``PresetsUI.committed`` is the text boxes' chain: what else follows such an
  edit (the draft) chains on it rather than listening to the box too, as no event may have two "always_last"
  listeners (``tests/test_ui_events.py`` says why).
Every error (bad value, bad name, bad YAML) is a visible sentence naming the key or line.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from studio.config import ConfigError, RunConfig, field_specs, field_type
from studio.estimate import advice, arch_for, estimate
from studio.presets import find_preset, list_presets, load_preset, parse_yaml, save_preset
from studio.security import SecurityError, check_name
from studio.speed import plan as speed_plan
from studio.speed.profiles import PROFILES
from studio.ui.widgets import get_value, named, to_config, widget

SECTIONS = (("Model & quantization", "model"), ("LoRA", "lora"), ("Training", "train"),
            ("Speed: how it computes, never what it learns", "speed"), ("Output", "output"))
KEYS = [k for k in field_specs() if k.split(".")[0] in {s for _, s in SECTIONS}]
# Keys shown as text boxes: they are looked up only when left or submitted, not on every keystroke.
TEXT_KEYS = {k for k in KEYS if field_type(k) not in (bool, int, float) and "choices" not in field_specs()[k].metadata}
FIT_HEADERS = ["machine", "memory (GiB)", "estimated peak (GiB)", "fits", "what runs there"]
PLAN_HEADERS = ["part", "what runs", "why"]
# Switches most runs leave alone (memory, GPU-only, every speed override): each section keeps them in a closed
# accordion; the speed section is all overrides of the planner.
ADVANCED = {"model.double_quant", "model.attn_implementation", "model.trust_remote_code", "model.revision",
            "train.tensorboard", "train.num_gpus", "train.fsdp", "train.weight_decay", "train.max_grad_norm",
            "train.logging_steps", "train.save_total_limit", "train.sample_max_new_tokens",
            *(k for k in field_specs() if k.startswith("speed."))}
MAX_YAML_BYTES = 256 * 1024
RETRY_AFTER_S = 60.0


@dataclass
class PresetsUI:
    preset: gr.Dropdown
    base: gr.State
    keys: list[str]
    inputs: list
    base_model: gr.Textbox
    description: gr.Markdown
    changes: gr.Markdown
    fit_table: gr.Dataframe
    fit_verdict: gr.Markdown
    plan_table: gr.Dataframe
    save_name: gr.Textbox
    save_button: gr.Button
    yaml_upload: gr.UploadButton
    status: gr.Markdown
    committed: gr.events.Dependency  # the panels took on a text box left or submitted: chain ``.then`` here


def display(key: str, value):
    """A config value as its widget shows it (lists as comma-separated text)."""
    return ", ".join(value) if isinstance(value, list) else value


def shown(value) -> str:
    """A value in the changes list: numbers as people write them (4 not 4.0, 2e-05), text quoted."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return f"{value:g}"
    return repr(value)


def values_of(cfg: RunConfig) -> list:
    return [display(k, get_value(cfg, k)) for k in KEYS]


def describe_preset(cfg: RunConfig) -> str:
    return f"**{cfg.name}**: {cfg.description}" if cfg.description else f"**{cfg.name}**"


def _config(base: dict, values) -> RunConfig:
    return to_config(RunConfig.from_dict(base), KEYS, list(values))


# ---- handlers -----------------------------------------------------------------------------------

def _fill(cfg: RunConfig, status: str):
    return (cfg.to_dict(), describe_preset(cfg), *values_of(cfg), status)


def _keep(status: str):
    return (gr.update(), gr.update(), *(gr.update() for _ in KEYS), status)


def preset_choices(extra: str | None = None) -> list:
    """The preset list read afresh (a preset saved in another browser appears), plus a loaded YAML's label."""
    names = list(list_presets())
    return [*names, (extra, extra)] if extra and extra not in names else names


def yaml_label(filename: str) -> str:
    return f"{Path(filename).name} (loaded file, not saved)"


def choose_preset(name: str):
    """-> (base, description, *widget values, status)."""
    if not name or name.endswith("(loaded file, not saved)"):
        return _keep("")
    try:
        # A name from the list, never a path: the event can be sent by hand with any string.
        cfg = load_preset(find_preset(check_name(name, "preset")))
    except (ConfigError, SecurityError) as e:
        return _keep(f"⚠️ {e}")
    return _fill(cfg, f"Loaded preset **{name}**.")


def load_yaml(file) -> tuple:
    """An uploaded YAML becomes the base: -> (base, description, *widget values, status)."""
    if not file:
        return _keep("")
    p = Path(file)
    try:
        if p.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError("", f"{p.name}: larger than {MAX_YAML_BYTES // 1024} KB; a preset is a short YAML file.")
        cfg = parse_yaml(p.read_text(encoding="utf-8-sig"), p.name)
    except UnicodeDecodeError:
        return _keep(f"⚠️ {p.name}: not UTF-8 text; save the YAML as UTF-8.")
    except (ConfigError, OSError) as e:
        return _keep(f"⚠️ {e}")
    return _fill(cfg, f"Loaded **{p.name}** (preset name {cfg.name}); save it to add it to the list.")


def yaml_shown(file, status: str):
    """The preset list after a YAML load: the file's name, chosen, so the list says what the widgets hold."""
    if not file or not (status or "").startswith("Loaded"):
        return gr.update()
    label = yaml_label(file)
    return gr.update(choices=preset_choices(label), value=label)


def changes(base: dict, *values) -> str:
    """Markdown listing every key that differs from the preset, or the validation error."""
    try:
        before = RunConfig.from_dict(base)
        after = to_config(before, KEYS, list(values))
    except (ConfigError, SecurityError) as e:
        return f"⚠️ {e}"
    diff = [(k, get_value(before, k), get_value(after, k)) for k in KEYS]
    lines = [f"- `{k}`: {shown(display(k, a))} → {shown(display(k, b))}" for k, a, b in diff if a != b]
    if not lines:
        return f"No changes from **{before.name}**."
    return f"**{len(lines)} changed from {before.name}:**\n" + "\n".join(lines)


def save(base: dict, name: str, *values):
    """-> (status, preset dropdown update listing the new preset and choosing it)."""
    name = (name or "").strip()
    try:
        path = save_preset(_config(base, values), name)
    except (ConfigError, SecurityError) as e:
        return f"⚠️ {e}", gr.update()
    return f"Saved preset **{name}** to {path}.", gr.update(choices=preset_choices(), value=name)


def adopt_saved(name: str, status: str):
    """After a save: the saved preset becomes the base the changes are measured from (status kept)."""
    if not (status or "").startswith("Saved"):
        return _keep(status)
    base, desc, *values, _ = choose_preset(name)
    return (base, desc, *values, status)


_ARCH: dict[tuple, object] = {}
_ARCH_LOCK = threading.Lock()


def cached_arch(cfg: RunConfig):
    """``arch_for`` once per model; an unknown shape is asked again after a minute (the network may return)."""
    key = (cfg.model.base_model, cfg.model.revision, cfg.model.trust_remote_code)
    with _ARCH_LOCK:
        hit = _ARCH.get(key)
        if hit is not None and (hit[0] is not None or time.monotonic() - hit[1] < RETRY_AFTER_S):
            return hit[0]
        arch = arch_for(cfg)
        _ARCH[key] = (arch, time.monotonic())
        return arch


_HERE: list = []


def this_machine():
    """This machine's ``Hardware``, detected once."""
    if not _HERE:
        from studio.hardware import detect

        _HERE.append(detect())
    return _HERE[0]


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def _fits(p, hw) -> bool:
    return p.estimate_gib is not None and p.estimate_gib <= hw.total_bytes / 2**30 * 0.95


def fit(base: dict, *values):
    """-> (fit rows: machine, memory, estimated peak, fits, what runs there; verdict markdown; plan rows for this
    machine: part, what runs, why)."""
    try:
        cfg = _config(base, values)
    except (ConfigError, SecurityError) as e:
        return [], f"⚠️ {e}", []
    arch = cached_arch(cfg)
    here = this_machine()
    mine = speed_plan(cfg, here, arch=arch)
    plan_rows = [list(r) for r in mine.rows()]
    name = f"{here.name} (this machine)" if here.device == "cuda" else "CPU only (this machine)"
    notes = "".join(f"\n\n⚠️ {n}" for n in mine.notes)
    if arch is None:
        return [], (f"**This machine: {name.split(' (')[0]}.** The shape of **{cfg.model.base_model}** is unknown "
                    "offline: it is not in the built-in table and its config could not be read. Connect to the "
                    "internet or give a local model folder to estimate memory." + notes), plan_rows
    rows = []
    if here.device == "cuda":
        rows.append([name, round(here.total_gib, 1), mine.estimate_gib, "yes" if _fits(mine, here) else "no",
                     mine.summary()])
    else:
        est = estimate(cfg, arch, mine)
        ram = here.total_bytes / 2**30
        rows.append([name, round(ram, 1), round(est.total_gib, 1), "yes" if est.total_gib <= ram * 0.8 else "no",
                     "trains in system RAM, slowly: " + mine.summary()])
    misses = []
    for gpu, hw in PROFILES.items():
        p = speed_plan(cfg, hw, arch=arch)
        ok = _fits(p, hw)
        if not ok:
            misses.append((gpu, advice(cfg, estimate(cfg, arch, p), hw.total_bytes / 2**30, p)))
        rows.append([gpu, round(hw.total_bytes / 2**30, 1), p.estimate_gib, "yes" if ok else "no",
                     p.summary() if ok else "to fit: " + "; ".join(misses[-1][1])])
    est = estimate(cfg, arch, mine) if here.device == "cuda" else estimate(cfg, arch, speed_plan(
        cfg, PROFILES["A100 80 GB"], arch=arch))
    parts = ", ".join(f"{k} {_size(v)}" for k, v in est.parts.items())
    where = "here" if here.device == "cuda" else "on an A100 80 GB"
    head = (f"**This machine: {name.split(' (')[0]}**: {mine.summary()}.{notes}\n\nEstimated peak {where} ≈ "
            f"**{_size(est.total)}** allocated, ≈ {est.reserved_gib():.1f} GiB with the CUDA context and allocator "
            f"cache ({parts}).")
    if not misses:
        return rows, head + "\n\n✅ Fits on every GPU listed.", plan_rows
    if len(misses) == len(PROFILES):
        return rows, head + f"\n\n❌ Fits on none of these GPUs. To fit: {'; '.join(misses[-1][1])}.", plan_rows
    fits_on = [r[0] for r in rows[1:] if r[3] == "yes"]
    gpu, tips = misses[0]
    return rows, head + (f"\n\n⚠️ Fits on {', '.join(fits_on)}; not on {', '.join(m[0] for m in misses)}. "
                         f"For {gpu}: {'; '.join(tips)}."), plan_rows


# ---- layout -------------------------------------------------------------------------------------

def _initial(ctx) -> tuple[RunConfig, str]:
    try:
        return load_preset(ctx.default_preset), ""
    except ConfigError as e:
        return RunConfig(), f"⚠️ {e}"


def _triggers(components: dict, text: bool) -> list:
    """User edits only (a preset switch refills every widget and redraws once, through ``redraw``): the text
    boxes' when left or submitted (``text``), so a half-typed model id is never looked up, else the others'."""
    out = []
    for key, c in components.items():
        if (key in TEXT_KEYS) == text:
            out += [c.blur, c.submit] if text else [c.input]
    return out


def _section(cfg0: RunConfig, section: str, components: dict) -> None:
    """One section's widgets in a wrapping row, its checkboxes in a row of their own after them (Gradio
    ignores a Checkbox's min_width, so beside sliders a checkbox would be squeezed to a sliver); the section's
    advanced switches the same way inside a closed accordion."""
    def make(key):
        components[key] = widget(key, get_value(cfg0, key), min_width=220,
                                 elem_id="presets-" + key.replace(".", "-").replace("_", "-"))

    def rows(keys):
        flags = [k for k in keys if field_type(k) is bool]
        with gr.Row():
            for key in keys:
                if key not in flags:
                    make(key)
        if flags:
            with gr.Row():
                for key in flags:
                    with gr.Column(min_width=220):
                        make(key)

    keys = [k for k in KEYS if k.startswith(section + ".")]
    if section == "speed":  # every key here overrides the planner: the section itself is the fold
        rows(keys)
        return
    rows([k for k in keys if k not in ADVANCED])
    advanced = [k for k in keys if k in ADVANCED]
    if advanced:
        with gr.Accordion("More: memory and GPU-only switches", open=False, elem_id=f"presets-{section}-advanced"):
            rows(advanced)


def build(ctx) -> PresetsUI:
    cfg0, status0 = _initial(ctx)
    names = list(list_presets())
    with gr.Row(equal_height=True):
        preset = gr.Dropdown(choices=names, value=cfg0.name if cfg0.name in names else None, label="Preset",
                             info="Shipped presets and the ones you saved.", elem_id="presets-choice", scale=1)
        description = gr.Markdown(describe_preset(cfg0), elem_id="presets-description")
    status = gr.Markdown(status0, elem_id="presets-status")
    base = gr.State(cfg0.to_dict())

    components: dict = {}
    with gr.Row():
        with gr.Column(scale=3):
            for title, section in SECTIONS:
                with gr.Accordion(title, open=section not in ("output", "speed"), elem_id=f"presets-section-{section}"):
                    _section(cfg0, section, components)
        with gr.Column(scale=2):
            with gr.Row(equal_height=True):
                save_name = gr.Textbox(label="save as preset", show_label=False, container=False,
                                       placeholder="name to save as, e.g. my-preset", elem_id="presets-save-name",
                                       scale=1, min_width=140)
                save_button = gr.Button("Save preset", elem_id="presets-save", scale=0, min_width=130, size="md")
                yaml_upload = gr.UploadButton("Load YAML…", file_types=[".yaml", ".yml"], type="filepath",
                                              elem_id="presets-yaml", scale=0, min_width=130, size="md")
            gr.Markdown("### Changes from the preset")
            values0 = values_of(cfg0)
            changed = gr.Markdown(changes(cfg0.to_dict(), *values0), elem_id="presets-changes")
            gr.Markdown("### How it runs here, and will it fit?")
            rows0, verdict0, plan0 = fit(cfg0.to_dict(), *values0)
            fit_verdict = gr.Markdown(verdict0, elem_id="presets-fit-verdict")
            plan_table = gr.Dataframe(value=plan0 or None, headers=PLAN_HEADERS, label="speed plan on this machine",
                                      interactive=False, wrap=True, elem_id="presets-plan",
                                      column_widths=["24%", "18%", "58%"])
            fit_table = gr.Dataframe(value=rows0 or None, headers=FIT_HEADERS,
                                     label="this machine and common GPUs: the planner's choice and its peak memory",
                                     interactive=False, wrap=True, elem_id="presets-fit",
                                     column_widths=["22%", "11%", "12%", "8%", "47%"])

    inputs = [components[k] for k in KEYS]
    state_in = [base, *inputs]
    filled = [base, description, *inputs, status]

    def redraw(dep):
        return dep.then(changes, state_in, changed, api_visibility="private") \
            .then(fit, state_in, [fit_table, fit_verdict, plan_table], api_visibility="private")

    # .input: only the user's choice reloads a preset (a saved preset or a loaded YAML set the list's value too).
    redraw(preset.input(choose_preset, preset, filled, api_visibility="private"))
    redraw(yaml_upload.upload(load_yaml, yaml_upload, filled, api_visibility="private")
           .then(yaml_shown, [yaml_upload, status], preset, api_visibility="private"))
    redraw(save_button.click(save, [base, save_name, *inputs], [status, preset], api_visibility="private")
           .then(adopt_saved, [preset, status], filled, api_visibility="private"))
    # An edit redraws the changes, then the fit, in one chain: two "always_last" listeners of one event restart
    # each other for ever (Gradio's page sends the whole event again when a listener it held back finishes, and
    # the other is held back by then), so the panels would stay busy.  Each step is "always_last" (a chained step
    # that is still running would otherwise skip the newer edit), and the two chains queue as one
    # (``concurrency_id``), so the panels end on the last edit whichever box it was in.
    estimate = named(fit, ["base", *KEYS])

    def on_edit(triggers, **api):
        return gr.on(triggers, changes, state_in, changed, api_visibility="private", trigger_mode="always_last",
                     concurrency_id="presets-changes") \
            .then(estimate, state_in, [fit_table, fit_verdict, plan_table], trigger_mode="always_last",
                  concurrency_id="presets-fit", **api)

    on_edit(_triggers(components, text=False), api_name="estimate")
    committed = on_edit(_triggers(components, text=True), api_visibility="private")
    return PresetsUI(preset, base, list(KEYS), inputs, components["model.base_model"], description, changed,
                     fit_table, fit_verdict, plan_table, save_name, save_button, yaml_upload, status, committed)
