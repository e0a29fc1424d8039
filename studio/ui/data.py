"""The Data tab: choose the data, see exactly what the model will read, and set the ``data.*`` config.

Contract: ``build(ctx, base_model=None) -> DataUI``, callable inside an open ``gr.Blocks``.
``DataUI.keys``/``DataUI.inputs`` hold every ``data.*`` key the Train tab needs, in the same order, with
components (or ``gr.State``) whose values are those keys' values.  The tab starts on ``ctx.default_data``
with the ``data`` section of ``ctx.default_preset``, its preview already drawn, so the demo needs no click.

Sources: a shipped sample (``samples/``), an upload (copied to ``studio_home()/uploads/<name>-<sha>.<ext>``
so runs keep a stable path to exactly those bytes) or a hub dataset (needs internet).
The preview tokenizes with the tokenizer of the base model in ``DataUI.base_model`` (``build``'s
``base_model`` component when given, else a textbox holding the default preset's model; ``link_base_model``
lets the Presets tab drive it).  Every failure (unreadable file, bad mapping, missing tokenizer) is a
visible sentence in the status, never a traceback.  Only files under ``samples/`` and the uploads folder are
read (``check_data_path``): the preview endpoint never shows another file of the server.

The length histogram's axis ends past Tukey's far fence, so a few outliers do not squeeze the bars (a note
says how many are off the axis); byte-level tokens (``�``) are explained under the preview.  What the tab
holds is kept in the server-side draft and restored on a page load (``studio.ui.state``).

Layout: source and column mapping, then the preview controls (template, tokenizer, examples shown), the
preview itself, its counts and length histogram; length, validation and sampling settings sit in a closed
accordion below.

Handlers are plain functions, tested directly: ``store_upload``, ``load_source``, ``refresh``
(served as ``api_name="preview"`` with simple values) and ``mapping_state``.  ``refresh`` says ready only
where a run would start: it checks the values with ``RunConfig`` and the data with the pipeline's own
``check_ready``; ``check_before_start`` runs the same for the Train tab's Start, so both refuse alike.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from studio.config import ConfigError, DataSection, RunConfig
from studio.data.files import SUFFIXES, DataError, check_size, read_hub, read_records
from studio.data.pipeline import check_batch, check_ready, preview, select
from studio.data.schema import detect
from studio.data.stats import length_stats
from studio.data.templates import TemplateSpec, describe, render
from studio.modeling import ModelError, load_tokenizer
from studio.presets import REPO_ROOT, load_preset
from studio.runs import studio_home
from studio.security import SecurityError, check_name, hub_token, inside, inside_any
from studio.ui.column_dropdown import ColumnDropdown
from studio.ui.widgets import widget

LOSS, MASKED = "loss", "prompt (masked)"
COLORS = {LOSS: "#16a34a", MASKED: "#9ca3af"}
ROLE_ORDER = ("instruction", "input", "response", "system", "messages")
NONE_CHOICE = ("(none)", "")
STATS_LIMIT = 5000  # tokenizing more than this on every change would make the tab sluggish
RETRY_AFTER_S = 60.0  # a failed tokenizer load is not retried on every keystroke, but is after a minute
DEFAULT_CUSTOM_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
COUNT_HEADERS = ["example", "tokens", "loss tokens", "truncated"]


@dataclass
class DataUI:
    keys: list[str]
    inputs: list
    path: gr.Textbox
    sample: gr.Dropdown
    upload: gr.File
    val_upload: gr.UploadButton
    hub_load: gr.Button
    mapping: gr.State
    role_dropdowns: dict
    schema: gr.Markdown
    template_text: gr.Textbox
    preview: gr.HighlightedText
    counts: gr.Dataframe
    histogram: gr.Plot
    length_summary: gr.Markdown
    status: gr.Markdown
    source: gr.Markdown
    base_model: gr.components.Component
    preview_inputs: list  # what ``refresh`` reads, for callers chaining a redraw (``link_base_model``)
    preview_outputs: list
    detected: gr.State  # the mapping detected for the current source ({} until one is read)


# ---- sources ------------------------------------------------------------------------------------

def sample_files() -> dict[str, str]:
    """Shipped sample name -> absolute path."""
    d = REPO_ROOT / "samples"
    return {p.name: str(p) for p in sorted(d.iterdir()) if p.suffix.lower() in SUFFIXES} if d.is_dir() else {}


def upload_name(filename: str, digest: str) -> str:
    p = Path(filename)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", p.stem).strip("._-")[:60] or "data"
    return check_name(f"{stem}-{digest[:10]}{p.suffix.lower()}", "upload name")


def store_upload(tmp_path: str) -> Path:
    """Copy an uploaded file under ``uploads/``; the name carries a content hash, so it never changes."""
    src = Path(tmp_path)
    if src.suffix.lower() not in SUFFIXES:
        raise DataError(f"{src.name}: unsupported file type '{src.suffix}'; use one of {', '.join(SUFFIXES)}.")
    check_size(src)
    h = hashlib.sha256()
    with src.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    root = studio_home() / "uploads"
    dest = inside(root, upload_name(src.name, h.hexdigest()))
    tmp = dest.with_name(dest.name + ".part")
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            shutil.copyfile(src, tmp)
            tmp.replace(dest)
    except OSError as e:
        from studio.failures import DiskFull, is_disk_full

        tmp.unlink(missing_ok=True)  # no half-copied file is left behind
        if is_disk_full(e):
            raise DiskFull(root, "storing the upload") from e
        raise
    return dest


def data_roots() -> list[Path]:
    return [REPO_ROOT / "samples", studio_home() / "uploads"]


def check_data_path(path: str) -> Path:
    """A data file the UI may read: a shipped sample or an upload, never any other file of the server."""
    try:
        p = inside_any(path, data_roots(), REPO_ROOT)
    except SecurityError as e:
        raise DataError(str(e)) from None
    if not p.is_file():
        raise DataError(f"{Path(path).name}: no such file; choose a sample or upload the file again.")
    return p


_RECORDS: OrderedDict = OrderedDict()
_RECORDS_LOCK = threading.Lock()


def read_source(path: str, hub_dataset: str = "", hub_config: str = "", split: str = "train") -> list[dict]:
    """Records of the chosen file or hub split; the last few are cached (hub loads are slow)."""
    path, hub_dataset = (path or "").strip(), (hub_dataset or "").strip()
    if path:
        p = check_data_path(path)
        st = p.stat()
        key = ("file", str(p), st.st_mtime_ns, st.st_size)
    elif hub_dataset:
        key = ("hub", hub_dataset, hub_config or "", split or "train")
    else:
        raise DataError("data.path: no data chosen; pick a sample, upload a file or name a hub dataset.")
    with _RECORDS_LOCK:
        if key in _RECORDS:
            _RECORDS.move_to_end(key)
            return _RECORDS[key]
    records = read_records(p) if path else read_hub(hub_dataset, hub_config or "", split or "train",
                                                       hub_token())
    with _RECORDS_LOCK:
        _RECORDS[key] = records
        while len(_RECORDS) > 4:
            _RECORDS.popitem(last=False)
    return records


def source_label(path: str, hub_dataset: str = "", hub_config: str = "", split: str = "train") -> str:
    if (path or "").strip():
        return f"Using file **{Path(path).name}**."
    if (hub_dataset or "").strip():
        cfg = f", config {hub_config}" if hub_config else ""
        return f"Using hub dataset **{hub_dataset}** (split {split or 'train'}{cfg})."
    return "No data chosen yet."


# ---- tokenizers ---------------------------------------------------------------------------------

_TOKENIZERS: dict[str, object] = {}
_TOK_FAILED: dict[str, tuple[float, str]] = {}
_TOK_LOCK = threading.Lock()


def tokenizer_for(model: str):
    """(tokenizer, "") or (None, why): one load per model name, failures retried after a minute."""
    name = (model or "").strip()
    if not name:
        return None, "No base model is named, so tokens cannot be counted; set model.base_model in Presets."
    with _TOK_LOCK:
        if name in _TOKENIZERS:
            return _TOKENIZERS[name], ""
        failed = _TOK_FAILED.get(name)
        if failed and time.monotonic() - failed[0] < RETRY_AFTER_S:
            return None, failed[1]
        try:
            tok = load_tokenizer(RunConfig.from_dict({"model": {"base_model": name}}))
        except (ModelError, ConfigError, OSError, ValueError) as e:
            why = (f"The tokenizer of {name} could not be loaded ({e}); the preview shows text only, "
                   "without token counts. Offline, only the built-in studio-tiny-mistral or a local folder works.")
            _TOK_FAILED[name] = (time.monotonic(), why)
            return None, why
        _TOKENIZERS[name] = tok
        return tok, ""


# ---- handlers -----------------------------------------------------------------------------------

def _role_updates(columns: list[str], mapping: dict[str, str]) -> list:
    choices = [NONE_CHOICE] + [(c, c) for c in columns]
    return [gr.update(choices=choices, value=mapping.get(r, "")) for r in ROLE_ORDER]


def load_source(path: str, hub_dataset: str = "", hub_config: str = "", split: str = "train"):
    """-> (schema text, 5 role dropdown updates, detected mapping, mapping state {} i.e. "as detected")."""
    try:
        records = read_source(path, hub_dataset, hub_config, split)
    except DataError as e:
        return (f"No data loaded: {e}", *_role_updates([], {}), {}, {})
    det = detect(records)
    text = f"**{len(records)} records**, columns: {', '.join(f'`{c}`' for c in det.columns)}.\n\n{det.message}"
    return (text, *_role_updates(det.columns, det.mapping), dict(det.mapping), {})


def mapping_state(detected: dict, *role_values) -> dict:
    """The ``data.mapping`` value: empty while the dropdowns show what was detected, else the override."""
    chosen = {r: v for r, v in zip(ROLE_ORDER, role_values) if v}
    return {} if chosen == {k: v for k, v in (detected or {}).items() if v} else chosen


def _skip_note(skipped: list[str], total: int) -> str:
    if not skipped:
        return ""
    shown = "\n".join(f"- {s}" for s in skipped[:5])
    more = f"\n- … and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    return f"\n\n**{len(skipped)} of {total} records skipped:**\n{shown}{more}"


def _header(i: int, detail: str = "") -> str:
    gap = "\n\n" if i > 1 else ""
    return f"{gap}── example {i}{detail} ──\n"


def _token_pieces(shown: list[dict]) -> tuple[list, list]:
    pieces, rows = [], []
    for i, ex in enumerate(shown, 1):
        cut = f", cut to {len(ex['tokens'])}" if ex["truncated"] else ""
        pieces.append((_header(i, f" · {ex['n_tokens']} tokens{cut}"), None))
        pieces += [(piece, LOSS if loss else MASKED) for piece, loss in ex["tokens"]]
        rows.append([i, ex["n_tokens"], ex["loss_tokens"], "yes" if ex["truncated"] else "no"])
    return pieces, rows


def _text_pieces(examples, spec: TemplateSpec, n: int, train_on_inputs: bool) -> list:
    """Without a tokenizer: the rendered text, prompt vs response, so the template can still be checked."""
    pieces = []
    for i, ex in enumerate(examples[:n], 1):
        prompt, response = render(ex, spec, None)
        pieces.append((_header(i), None))
        pieces += [(prompt, LOSS if train_on_inputs else MASKED), (response, LOSS)]
    return pieces


def axis_end(lengths: list[int], max_length: int) -> int | None:
    """Where the length axis should end so a few outliers do not squeeze every bar to the left: a little past
    the longest example within Tukey's far fence (third quartile + 3 interquartile ranges) and the max-length
    line, or None when nothing lies beyond it."""
    if not lengths:
        return None
    ordered = sorted(lengths)
    q1, q3 = ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4]
    fence = q3 + 3 * max(q3 - q1, 1)
    typical = max(x for x in ordered if x <= fence) if ordered[0] <= fence else ordered[0]
    end = int(max(typical, max_length) * 1.15) + 1
    return end if ordered[-1] > end else None


def length_figure(lengths: list[int], max_length: int):
    import plotly.graph_objects as go

    end = axis_end(lengths, max_length)
    shown = [x for x in lengths if end is None or x <= end]
    fig = go.Figure(go.Histogram(x=shown, nbinsx=min(60, max(10, len(set(shown)))), marker_color="#2563eb",
                                 name="examples"))
    fig.add_vline(x=max_length, line_dash="dash", line_color="#dc2626", line_width=2,
                  annotation_text=f"max length {max_length}", annotation_position="top right")
    if end is not None:
        beyond = len(lengths) - len(shown)
        fig.update_xaxes(range=[0, end])
        # Above the plot's left corner: clear of the bars and of the max-length label at the top right.
        fig.add_annotation(x=0, y=1, xref="paper", yref="paper", xanchor="left", yanchor="bottom", showarrow=False,
                           text=f"{beyond} longer example{'s' if beyond != 1 else ''} off the axis "
                                f"(longest {max(lengths)})", font=dict(color="#6b7280"))
    fig.update_layout(xaxis_title="tokens per example (before truncation)", yaxis_title="examples",
                      height=300, margin=dict(l=40, r=20, t=30, b=40), showlegend=False, bargap=0.05)
    return fig


BYTE_NOTE = ("ℹ️ `�` marks a byte-level token: the tokenizer split a character it has no token for (an accented "
             "letter, a symbol, an emoji) into its bytes, and one byte alone is not a character. The model reads "
             "the bytes; the text is unchanged.")


def byte_note(pieces: list) -> str:
    return "\n\n" + BYTE_NOTE if any("\ufffd" in (t or "") for t, _ in pieces) else ""


def _data_config(path, hub_dataset, hub_config, split, roles, template, custom_prompt, custom_response,
                 max_length, train_on_inputs, train_samples, val_samples, val_fraction, val_path, seed) -> DataSection:
    """The ``data`` section these values make, checked by ``RunConfig`` exactly as Start checks it."""
    if max_length is None or max_length < 8:
        raise DataError("data.max_length: enter a number of tokens (at least 8).")
    mapping = {r: v for r, v in zip(ROLE_ORDER, roles) if v}
    values = {"path": path or "", "hub_dataset": hub_dataset or "", "hub_config": hub_config or "",
              "split": split or "train", "template": template or "alpaca", "custom_prompt": custom_prompt or "",
              "custom_response": custom_response if custom_response is not None else "{response}",
              "mapping": mapping, "max_length": max_length, "train_on_inputs": bool(train_on_inputs),
              "train_samples": train_samples or 0, "val_samples": val_samples or 0,
              "val_fraction": val_fraction or 0.0, "val_path": val_path or "",
              "seed": 42 if seed is None else seed}
    return RunConfig.from_dict({"data": values}).data


def refresh(path: str, hub_dataset: str, hub_config: str, split: str, instruction: str, input: str,
            response: str, system: str, messages: str, template: str, custom_prompt: str, custom_response: str,
            max_length: float, train_on_inputs: bool, base_model: str, n_examples: float = 3,
            train_samples: float = 0, val_samples: float = 0, val_fraction: float = 0.0, val_path: str = "",
            seed: float = 42):
    """-> (highlighted tokens, per-example counts, length histogram, length summary, status).

    The status says ready only where training would start: the values pass ``RunConfig``'s checks and the
    data passes the pipeline's own (``select``: mapping, skips, split; ``check_tokenized``: responses kept
    within max length), the same calls ``prepare`` makes in the worker.
    """
    roles = (instruction, input, response, system, messages)
    empty = ([], [], None, "")
    try:
        n = max(1, int(n_examples or 3))
        d = _data_config(path, hub_dataset, hub_config, split, roles, template, custom_prompt, custom_response,
                         max_length, train_on_inputs, train_samples, val_samples, val_fraction, val_path, seed)
        spec = TemplateSpec.from_config(d)
        records = read_source(path, hub_dataset, hub_config, split)
        val_records = read_source(d.val_path) if d.val_path else None
        tok, why = tokenizer_for(base_model)
        if tok is None:
            sel = select(d, records, val_records)
            if spec.name == "chat":
                raise DataError(f"data.template: the chat template needs the model's tokenizer. {why}")
            return (_text_pieces(sel.examples, spec, n, train_on_inputs), [], None, "",
                    f"⚠️ {why}{_skip_note(sel.skipped, len(records))}")
        ready = check_ready(d, records, val_records, tok, STATS_LIMIT)
        sel, measured, dropped = ready.selection, ready.measured, ready.dropped
        examples, skipped = sel.examples, sel.skipped
        pieces, rows = _token_pieces(preview(examples, spec, tok, d.max_length, train_on_inputs, n))
        lengths = [t.full_length for t in ready.tokens]
    except (DataError, ConfigError, ValueError, KeyError) as e:
        return (*empty, f"⚠️ {e}")
    except Exception as e:  # noqa: BLE001 - the preview shows a sentence, never a bare "Error"
        return (*empty, f"⚠️ the data could not be previewed ({type(e).__name__}: {str(e)[:300]}).")
    stats = length_stats(lengths, d.max_length)
    part = f" (measured on the first {len(measured)} of {len(examples)} examples)" if len(measured) < len(examples) \
        else ""
    split_note = f" ({len(sel.train)} for training, {len(sel.validation)} for validation)" if sel.validation else ""
    drop_note = (f"\n\n⚠️ {dropped} training example{'s' if dropped != 1 else ''} lose{'s' if dropped == 1 else ''} "
                 f"the whole response to the max length of {d.max_length} tokens and will be left out.") \
        if dropped else ""
    status = f"✅ {len(examples)} examples ready{split_note}, tokenized with the {base_model} tokenizer." \
        + drop_note + _skip_note(skipped, len(records)) + byte_note(pieces)
    return pieces, rows, length_figure(lengths, d.max_length), stats.summary + part, status


def check_before_start(cfg: RunConfig) -> None:
    """Start's data check: the preview's own (``check_ready``) on a local file, so Start refuses what the
    preview refuses, with the same sentence, before any run folder exists.  A hub split, or a base model
    whose tokenizer cannot load here, is left to the worker, whose ``prepare`` runs the same checks."""
    d = cfg.data
    if not d.path:
        return
    records = read_source(d.path)
    val_records = read_source(d.val_path) if d.val_path else None
    tok, _ = tokenizer_for(cfg.model.base_model)
    if tok is None:
        select(d, records, val_records)
        return
    ready = check_ready(d, records, val_records, tok, STATS_LIMIT)
    train_n = len(ready.selection.train)
    if train_n <= STATS_LIMIT:  # on a GPU the planner may change the micro-batch, never above the effective batch
        check_batch(train_n - ready.dropped, cfg.speed.micro_batch or cfg.train.batch_size)


def template_changed(template: str, custom_prompt: str, custom_response: str):
    """-> (template text, custom prompt update, custom response update); custom starts from a working prompt."""
    custom = template == "custom"
    prompt = custom_prompt if (custom_prompt or "").strip() or not custom else DEFAULT_CUSTOM_PROMPT
    response = custom_response or "{response}"
    text = describe(TemplateSpec(template, prompt, response))
    return (text, gr.update(visible=custom, value=prompt), gr.update(visible=custom, value=response))


def pick_sample(path: str):
    """-> (data.path, data.hub_dataset cleared, source line): a file wins over a hub dataset."""
    return path or "", "", source_label(path)


def on_upload(file, current_path: str):
    """-> (data.path, hub cleared, source line, sample cleared); a refused upload keeps the current data
    (and the sample shown) and says why."""
    if not file:
        return current_path, gr.update(), source_label(current_path), gr.update()
    try:
        dest = str(store_upload(file))
    except (DataError, SecurityError, OSError) as e:
        return current_path, gr.update(), f"⚠️ Upload refused: {e}", gr.update()
    return dest, "", source_label(dest), None


def use_hub(hub_dataset: str, hub_config: str, split: str):
    """-> (data.path cleared, sample cleared, source line)."""
    if not (hub_dataset or "").strip():
        return gr.update(), gr.update(), "⚠️ Type a dataset id (owner/name) first."
    return "", None, source_label("", hub_dataset, hub_config, split)


def on_val_upload(file, current: str):
    """-> (data.val_path, note): the dropdown takes the stored upload's path as a custom value."""
    if not file:
        return current, ""
    try:
        dest = store_upload(file)
    except (DataError, SecurityError, OSError) as e:
        return current, f"⚠️ Validation upload refused: {e}"
    return str(dest), f"Validation file **{dest.name}**."


# ---- layout -------------------------------------------------------------------------------------

def link_base_model(data_ui: DataUI, component, changed_state=None) -> None:
    """Let another tab's base model box (Presets) drive the preview's tokenizer: when it is left or submitted,
    and when ``changed_state`` (the Presets tab's base config) changes on a preset switch."""
    triggers = [component.blur, component.submit] + ([changed_state.change] if changed_state is not None else [])
    gr.on(triggers, lambda v: v, component, data_ui.base_model, api_visibility="private") \
        .then(refresh, data_ui.preview_inputs, data_ui.preview_outputs, api_visibility="private")


def _defaults(ctx) -> tuple[DataSection, str]:
    try:
        cfg = load_preset(ctx.default_preset)
    except ConfigError:
        cfg = RunConfig()
    return cfg.data, cfg.model.base_model


def build(ctx, base_model=None) -> DataUI:
    d, default_model = _defaults(ctx)
    path0 = str(ctx.default_data) if ctx.default_data else d.path
    model0 = base_model.value if base_model is not None else default_model
    samples = sample_files()
    schema0, *rest = load_source(path0, d.hub_dataset, d.hub_config, d.split)
    roles0 = [d.mapping.get(r, "") for r in ROLE_ORDER] if d.mapping else [u["value"] for u in rest[:5]]
    n0 = 3
    pieces0, rows0, fig0, summary0, status0 = refresh(
        path0, d.hub_dataset, d.hub_config, d.split, *roles0, d.template, d.custom_prompt, d.custom_response,
        d.max_length, d.train_on_inputs, model0, n0, d.train_samples, d.val_samples, d.val_fraction, d.val_path,
        d.seed)

    gr.Markdown("Choose the examples to train on and check how the model will read them: green tokens carry "
                "the loss, grey prompt tokens are masked.")
    with gr.Row():
        with gr.Column(scale=1):
            sample = gr.Dropdown(choices=list(samples.items()), value=path0 if path0 in samples.values() else None,
                                 label="Sample file", info="Shipped finance samples in several formats.",
                                 elem_id="data-sample")
            upload = gr.File(label="…or upload a file (JSONL, JSON, CSV, Parquet)", file_types=list(SUFFIXES),
                             type="filepath", elem_id="data-upload", height=140)
            with gr.Accordion("…or a Hugging Face dataset (needs internet)", open=bool(d.hub_dataset)):
                hub = widget("data.hub_dataset", d.hub_dataset, label="dataset id", elem_id="data-hub-dataset")
                hub_config = widget("data.hub_config", d.hub_config, label="config", elem_id="data-hub-config")
                split = widget("data.split", d.split, label="split", elem_id="data-hub-split")
                hub_load = gr.Button("Load hub dataset", elem_id="data-hub-load")
            path = gr.Textbox(value=path0, label="data file path", visible="hidden", elem_id="data-path")
            source = gr.Markdown(source_label(path0, d.hub_dataset, d.hub_config, d.split), elem_id="data-source")
        with gr.Column(scale=1):
            schema = gr.Markdown(schema0, elem_id="data-schema")
            role_dds = {}
            # Short labels with room for a column name: the three common roles, then the chat ones.
            for group in (ROLE_ORDER[:3], ROLE_ORDER[3:]):
                with gr.Row():
                    for role in group:
                        upd, value = rest[ROLE_ORDER.index(role)], roles0[ROLE_ORDER.index(role)]
                        role_dds[role] = ColumnDropdown(choices=upd["choices"], value=value, label=role,
                                                        elem_id=f"data-map-{role}", min_width=160)
            mapping = gr.State(dict(d.mapping))
            detected = gr.State(rest[5])

    # The preview is the point of the tab: it comes right after the choices that shape it.
    with gr.Row():
        template = widget("data.template", d.template, elem_id="data-template")
        base_box = base_model if base_model is not None else gr.Textbox(
            model0, label="tokenizer of", info="Base model whose tokenizer counts the tokens.",
            elem_id="data-base-model")
        n_examples = gr.Slider(1, 20, value=n0, step=1, label="examples shown", elem_id="data-preview-count")
    status = gr.Markdown(status0, elem_id="data-status")
    highlighted = gr.HighlightedText(pieces0, label="preview: what the model sees", color_map=COLORS,
                                     show_legend=True, combine_adjacent=False, elem_id="data-preview")
    with gr.Row():
        with gr.Column(scale=1):
            counts = gr.Dataframe(value=rows0 or None, headers=COUNT_HEADERS, label="tokens per example",
                                  interactive=False, elem_id="data-counts")
            template_text = gr.Textbox(describe(TemplateSpec.from_config(d)), label="template text", lines=7,
                                       interactive=False, elem_id="data-template-text")
            # Shown only for the custom template, under the text it produces.
            custom_prompt = widget("data.custom_prompt", d.custom_prompt, lines=4, visible=d.template == "custom",
                                   elem_id="data-custom-prompt")
            custom_response = widget("data.custom_response", d.custom_response, lines=2,
                                     visible=d.template == "custom", elem_id="data-custom-response")
        with gr.Column(scale=2):
            histogram = gr.Plot(fig0, label="example lengths", elem_id="data-lengths")
            length_summary = gr.Markdown(summary0, elem_id="data-length-summary")

    with gr.Accordion("Length, validation split and sampling", open=False):
        with gr.Row():
            max_length = widget("data.max_length", d.max_length, elem_id="data-max-length")
            seed = widget("data.seed", d.seed, elem_id="data-seed")
            with gr.Column(min_width=220):  # Gradio ignores a Checkbox's own min_width
                train_on_inputs = widget("data.train_on_inputs", d.train_on_inputs, elem_id="data-train-on-inputs")
        with gr.Row():
            train_samples = widget("data.train_samples", d.train_samples, elem_id="data-train-samples")
            val_samples = widget("data.val_samples", d.val_samples, elem_id="data-val-samples")
            val_fraction = widget("data.val_fraction", d.val_fraction, elem_id="data-val-fraction")
        with gr.Row(equal_height=True):
            val_path = gr.Dropdown(choices=[("none: hold out from the data", "")] + list(samples.items()),
                                   value=d.val_path, allow_custom_value=True, label="validation file",
                                   info="A separate validation file overrides val samples and val fraction.",
                                   elem_id="data-val-path", scale=3)
            val_upload = gr.UploadButton("Upload a validation file…", file_types=list(SUFFIXES), type="filepath",
                                         elem_id="data-val-upload", scale=1, min_width=160)
        val_note = gr.Markdown(elem_id="data-val-note")

    role_list = list(role_dds.values())
    preview_inputs = [path, hub, hub_config, split, *role_list, template, custom_prompt, custom_response,
                      max_length, train_on_inputs, base_box, n_examples, train_samples, val_samples, val_fraction,
                      val_path, seed]
    preview_outputs = [highlighted, counts, histogram, length_summary, status]

    def reload(dep):
        """After the source changed: detect the schema, reset the mapping, redraw."""
        return dep.then(load_source, [path, hub, hub_config, split], [schema, *role_list, detected, mapping],
                        api_visibility="private") \
            .then(refresh, preview_inputs, preview_outputs, api_visibility="private")

    reload(sample.input(pick_sample, sample, [path, hub, source], api_visibility="private"))
    reload(upload.upload(on_upload, [upload, path], [path, hub, source, sample], api_visibility="private"))
    reload(hub_load.click(use_hub, [hub, hub_config, split], [path, sample, source], api_visibility="private"))
    # The draft listens to every value's change (``studio.ui.state``), so the preview follows the validation file
    # chosen or uploaded, not its change: no event may have two "always_last" listeners (``tests/test_ui_events.py``).
    val_upload.upload(on_val_upload, [val_upload, val_path], [val_path, val_note], api_visibility="private") \
        .then(refresh, preview_inputs, preview_outputs, api_visibility="private", trigger_mode="always_last")
    template.input(template_changed, [template, custom_prompt, custom_response],
                   [template_text, custom_prompt, custom_response], api_visibility="private") \
        .then(refresh, preview_inputs, preview_outputs, api_visibility="private")
    # A custom template's text, then the preview, in one chain (one "always_last" listener per event).
    gr.on([custom_prompt.input, custom_response.input], lambda t, p, r: template_changed(t, p, r)[0],
          [template, custom_prompt, custom_response], template_text, api_visibility="private",
          trigger_mode="always_last") \
        .then(refresh, preview_inputs, preview_outputs, api_visibility="private", trigger_mode="always_last")
    gr.on([dd.change for dd in role_list], mapping_state, [detected, *role_list], mapping,
          api_visibility="private", trigger_mode="always_last")
    # A given base model component may change programmatically (preset switch); our own box only when the
    # user leaves it, so a half-typed model id is never looked up.
    model_triggers = [base_box.change] if base_model is not None else [base_box.blur, base_box.submit]
    gr.on([*(dd.input for dd in role_list), max_length.input, train_on_inputs.input, n_examples.release,
           *model_triggers, train_samples.input, val_samples.input, val_fraction.input, val_path.input, seed.input],
          refresh, preview_inputs, preview_outputs, api_name="preview", trigger_mode="always_last")

    keys = ["data.path", "data.hub_dataset", "data.hub_config", "data.split", "data.train_samples",
            "data.val_samples", "data.val_fraction", "data.val_path", "data.template", "data.custom_prompt",
            "data.custom_response", "data.mapping", "data.max_length", "data.train_on_inputs", "data.seed"]
    inputs = [path, hub, hub_config, split, train_samples, val_samples, val_fraction, val_path, template,
              custom_prompt, custom_response, mapping, max_length, train_on_inputs, seed]
    return DataUI(keys, inputs, path, sample, upload, val_upload, hub_load, mapping, role_dds, schema, template_text,
                  highlighted, counts, histogram, length_summary, status, source, base_box, preview_inputs,
                  preview_outputs, detected)
