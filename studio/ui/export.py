"""Export tab: a finished run's adapter as a zip, merged into a 16-bit model, pushed to the Hub, and the
code that loads the result.

Contract:
- ``build(ctx)`` (inside an open ``gr.Blocks``) returns an ``ExportUI``; runs come from the run store
  (those with a final adapter), files from ``studio.export``.
- Named endpoints: ``zip`` (run id -> zip file, status), ``merge`` (run id -> status, load snippet) and
  ``push`` (run id, repo, private, merged, token -> status, cleared token).
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
        return merge(store, run_id)

    def on_push(run_id, repo_id, is_private, use_merged, hub_token):
        return push(store, run_id, repo_id, is_private, use_merged, hub_token)

    refresh.click(on_refresh, run, run, api_visibility="private")
    # On page load: pick up runs that finished since the app started (the newest first).
    gr.on(None, lambda: refresh_runs(store, None), outputs=run, api_visibility="private")
    gr.on([run.change, merged.change], on_snippet, [run, merged], code, api_visibility="private")
    zip_btn.click(on_zip, run, [file, status], api_name="zip") \
        .then(lambda path: gr.File(visible=bool(path)), file, file, api_visibility="private")
    merge_btn.click(on_merge, run, [status, code], api_name="merge")
    push_btn.click(on_push, [run, repo, private, merged, token], [status, token], api_name="push")
    return ExportUI(run, refresh, status, zip_btn, file, merge_btn, repo, private, merged, token, push_btn, code)
