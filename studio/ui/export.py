"""Export tab: a finished run's adapter as a zip, merged into a 16-bit model, pushed to the Hub, and the
code that loads the result.

Contract:
- ``build(ctx)`` (inside an open ``gr.Blocks``) returns an ``ExportUI``; runs come from the run store
  (those with a final adapter), files from ``studio.export``.
- Named endpoints: ``zip`` (run id -> zip file, status), ``merge`` (run id -> status, load snippet, merged zip),
  ``gguf`` (run id, kind -> files (GGUF, Modelfile, model card), status with the llama.cpp check) and ``push``
  (run id, repo, private, merged, token -> status, cleared token).  The merged model and the GGUF file are
  downloads in the browser, not only paths on the server.
- The Hub token is typed into a password box (empty falls back to ``HF_TOKEN``), used for the one
  call and never echoed: every status passes through ``redact`` (which also hides the typed value),
  and the token box is cleared after each push.  Nothing keeps it in the browser: Gradio's run history
  (which stored every call's inputs in localStorage) is off (``app.py``) and the box asks the browser's
  password manager not to offer saving it.
- Errors (no adapter yet, no token, no network) become the status line, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from studio import export as engine
from studio.playground import gpu_busy
from studio.runs import Run, RunStore
from studio.ui.run_picker import picker, refresh_runs
from studio.ui.messages import USER_ERRORS, message, scrub


def _run(store: RunStore, run_id: str | None) -> Run:
    if not run_id:
        raise ValueError("choose a finished run first.")
    return store.get(run_id)


def snippet(store: RunStore, run_id: str | None, merged: bool) -> str:
    try:
        run = _run(store, run_id)
        if merged and not (run.dir / "merged").exists():
            return "# no merged model yet: press Merge first."
        return real_base(run, engine.load_snippet(run, merged=bool(merged)))
    except USER_ERRORS as e:
        return f"# {message(e)}"


def real_base(run: Run, code: str) -> str:
    """The snippet with the base model named as ``from_pretrained`` can find it: the built-in demo's name
    (``studio-tiny-mistral``, known only to the studio) becomes its folder; a hub id or a folder stays."""
    from studio.modeling import TINY, resolve_base

    name = run.config().model.base_model
    if name != TINY:
        return code
    return code.replace(f'from_pretrained("{name}")', f'from_pretrained("{resolve_base(name)}")')


def make_zip(store: RunStore, run_id: str | None):
    """-> (zip path or None, status)."""
    try:
        path = engine.adapter_zip(_run(store, run_id))
    except USER_ERRORS as e:
        return None, f"**Could not zip:** {message(e)}"
    return str(path), f"Adapter zipped: `{path.name}` ({path.stat().st_size / 2**20:.1f} MiB)."


def merge(store: RunStore, run_id: str | None):
    """-> (status, load snippet for the merged model)."""
    try:
        run = _run(store, run_id)
        busy = gpu_busy(store)
        if busy:
            raise RuntimeError(busy)
        out = engine.merge(run)
    except USER_ERRORS as e:
        return f"**Could not merge:** {message(e)}", snippet(store, run_id, False)
    return f"Merged 16-bit model saved to `{out}`.", engine.load_snippet(run, merged=True)


def merged_download(store: RunStore, run_id: str | None) -> str | None:
    """The merged model as a zip for the browser, or None when there is none."""
    try:
        return str(engine.merged_zip(_run(store, run_id)))
    except USER_ERRORS:
        return None


def check_table(check: dict | None) -> str:
    """The llama.cpp check as Markdown (the same numbers the model card shows)."""
    if not check:
        return "**Not checked in llama.cpp** (llama-cpp-python is not installed here); the file was written."
    bar = ", ".join(f"{k} {'≥' if k == 'top1_agreement' else '≤' if k.startswith('max') else '='} {v}"
                    for k, v in check["bar"].items())
    rows = [("result", "**passed**" if check["passed"] else "**FAILED**"),
            ("prompts (the run's own)", check["prompts"]),
            ("tokenization identical to transformers", "yes" if check["tokens_equal"] else "no"),
            ("greedy answers equal", f"{check['greedy_equal']}/{check['prompts']}"),
            ("top-1 agreement (teacher-forced)", f"{check['top1_agreement']:.2%} of {check['positions']} positions"),
            ("max / mean abs logit difference", f"{check['max_abs_logit_diff']:.4f} / "
                                                f"{check['mean_abs_logit_diff']:.4f}"),
            ("bar", bar), ("tensor types", ", ".join(f"{k} {v}" for k, v in check["tensor_types"].items()))]
    if check.get("first_difference"):
        rows.append(("first difference", f"`{check['first_difference'][:200]}`"))
    return "| llama.cpp vs the merged model | |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def gguf_checks(store: RunStore, run_id: str | None) -> str:
    """The checks of the GGUF files a run already has (shown when the run is picked or the page reloads)."""
    from studio.model_card import gguf_checks as checks

    try:
        found = checks(_run(store, run_id))
    except USER_ERRORS:
        return ""
    return "\n\n".join(f"**{c['kind'].upper()}** (`{c.get('file', '')}`)\n\n{check_table(c)}" for c in found)


def gguf(store: RunStore, run_id: str | None, kind: str, progress=None):
    """-> (files to download: GGUF, Modelfile, model card; status with the check)."""
    try:
        run = _run(store, run_id)
        busy = gpu_busy(store)
        if busy:
            raise RuntimeError(busy)
        res = engine.export_gguf(run, kind or "q8_0", progress=progress)
    except USER_ERRORS as e:
        return None, f"**Could not export GGUF:** {message(e)}"
    status = (f"GGUF {kind.upper()} written: `{res.path.name}` ({res.path.stat().st_size / 2**20:.1f} MiB), with a "
              f"`Modelfile` for Ollama:\n\n```\n{res.ollama_create}\n```\n\n{check_table(res.check)}")
    return [str(res.path), str(res.modelfile), str(res.card)], status


def push(store: RunStore, run_id: str | None, repo: str, private: bool, merged: bool, token: str | None):
    """-> (status, "" to clear the token box).  The token goes to ``export.push`` and nowhere else."""
    try:
        url = engine.push(_run(store, run_id), (repo or "").strip(), token, private=bool(private),
                          merged=bool(merged))
    except USER_ERRORS as e:
        return f"**Could not push:** {message(e, token)}", ""
    except Exception as e:  # noqa: BLE001 - anything else must not reach Gradio's log or the browser unscrubbed
        return f"**Could not push:** {type(e).__name__}: {message(e, token)}", ""
    what = "merged model" if merged else "adapter"
    return scrub(f"Pushed the {what} to {url} ({'private' if private else 'public'}).", token), ""


@dataclass
class ExportUI:
    run: gr.Dropdown
    refresh: gr.Button
    status: gr.Markdown
    zip: gr.Button
    file: gr.File
    merge: gr.Button
    repo: gr.Textbox
    private: gr.Checkbox
    merged: gr.Checkbox
    token: gr.Textbox
    push: gr.Button
    snippet: gr.Code
    merged_file: gr.File
    gguf_kind: gr.Radio
    gguf: gr.Button
    gguf_files: gr.File
    gguf_status: gr.Markdown


def build(ctx) -> ExportUI:
    store = ctx.store
    run, refresh, first_id = picker(store, "export", "Runs with a final adapter.")
    status = gr.Markdown(elem_id="export-status")
    with gr.Row():
        with gr.Column():
            zip_btn = gr.Button("Zip the adapter", elem_id="export-zip")
            # Shown once a zip exists: empty, the file box is a tall blank panel.
            file = gr.File(label="Adapter zip", interactive=False, elem_id="export-file", visible=False)
        with gr.Column():
            merge_btn = gr.Button("Merge into a 16-bit model", elem_id="export-merge")
            gr.Markdown("Loads the base unquantized, merges the adapter and saves a standalone model "
                        "(safetensors) in the run's `merged/` folder.")
            merged_file = gr.File(label="Merged model (zip)", interactive=False, elem_id="export-merged-file",
                                  visible=False)
    with gr.Group():
        with gr.Row():
            gguf_kind = gr.Radio([("F16", "f16"), ("Q8_0", "q8_0"), ("Q4_K_M", "q4_k_m")], value="q8_0",
                                 label="GGUF type (llama.cpp, Ollama, LM Studio)", elem_id="export-gguf-kind")
            gguf_btn = gr.Button("Export GGUF and check it in llama.cpp", elem_id="export-gguf")
        gr.Markdown("Merges if needed, writes the GGUF file (Q4_K_M by llama.cpp's own quantizer) and an Ollama "
                    "`Modelfile` with the run's template and stop tokens, then loads the file in llama.cpp and "
                    "compares it with the merged model on the run's own prompts.")
        gguf_files = gr.File(label="GGUF, Modelfile and model card", file_count="multiple", interactive=False,
                             elem_id="export-gguf-files", visible=False)
        gguf_status = gr.Markdown(elem_id="export-gguf-status")
    with gr.Group():
        with gr.Row():
            repo = gr.Textbox(label="Hub repo", placeholder="owner/name", elem_id="export-repo")
            # autocomplete off: the browser's password manager is not offered the token either.
            token = gr.Textbox(label="Hub token", type="password", placeholder="empty: use HF_TOKEN",
                               info="Write access; used for this push only, never stored.", elem_id="export-token",
                               html_attributes=gr.InputHTMLAttributes(autocomplete="off", spellcheck=False))
        with gr.Row():
            private = gr.Checkbox(value=True, label="private repo", elem_id="export-private")
            merged = gr.Checkbox(value=False, label="push the merged model (instead of the adapter)",
                                 elem_id="export-merged")
            push_btn = gr.Button("Push to the Hub", elem_id="export-push")
    code = gr.Code(snippet(store, first_id, False), language="python", label="Load it in Python",
                   interactive=False, elem_id="export-snippet")

    def on_refresh(current):
        return refresh_runs(store, current)

    def on_snippet(run_id, use_merged):
        return snippet(store, run_id, use_merged)

    def on_zip(run_id):
        return make_zip(store, run_id)

    def on_merge(run_id):
        status_text, code_text = merge(store, run_id)
        return status_text, code_text, merged_download(store, run_id)

    def on_gguf(run_id, kind, progress=gr.Progress()):
        return gguf(store, run_id, kind, progress=lambda frac, desc: progress(frac, desc=desc))

    def on_push(run_id, repo_id, is_private, use_merged, hub_token):
        return push(store, run_id, repo_id, is_private, use_merged, hub_token)

    refresh.click(on_refresh, run, run, api_visibility="private")
    # On page load: pick up runs that finished since the app started (the newest first).
    gr.on(None, lambda: refresh_runs(store, None), outputs=run, api_visibility="private")
    # A run chosen: its GGUF checks, then the snippet, in one chain (two "always_last" listeners of one event
    # restart each other for ever: ``tests/test_ui_events.py``).
    run.change(lambda run_id: gguf_checks(store, run_id), run, gguf_status, api_visibility="private") \
        .then(on_snippet, [run, merged], code, api_visibility="private", trigger_mode="always_last")
    merged.change(on_snippet, [run, merged], code, api_visibility="private")
    zip_btn.click(on_zip, run, [file, status], api_name="zip") \
        .then(lambda path: gr.File(visible=bool(path)), file, file, api_visibility="private")
    merge_btn.click(on_merge, run, [status, code, merged_file], api_name="merge") \
        .then(lambda path: gr.File(visible=bool(path)), merged_file, merged_file, api_visibility="private")
    gguf_btn.click(on_gguf, [run, gguf_kind], [gguf_files, gguf_status], api_name="gguf") \
        .then(lambda files: gr.File(visible=bool(files)), gguf_files, gguf_files, api_visibility="private")
    push_btn.click(on_push, [run, repo, private, merged, token], [status, token], api_name="push")
    return ExportUI(run, refresh, status, zip_btn, file, merge_btn, repo, private, merged, token, push_btn, code,
                    merged_file, gguf_kind, gguf_btn, gguf_files, gguf_status)
