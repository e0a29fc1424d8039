"""QLoRA Studio: start the browser studio.

    python app.py                       # http://127.0.0.1:7860, the offline tiny demo preselected
    python app.py --host 0.0.0.0 --auth user:password
    python app.py --share --auth user:password

Binds 127.0.0.1 by default.  A non-loopback address or a share link is refused without a username
and password (``--auth`` or ``STUDIO_USERNAME``/``STUDIO_PASSWORD``; on a Hugging Face Space set them
as secrets; prefer the variables: a command line is visible to every user of the machine).  Only the
runs root and Gradio's own cache are served.  Every request passes ``studio.ui.gate`` first: the routes
the studio uses need the login when a password is set, every other Gradio route (run history, MCP,
monitoring, deep links, ...) is off, and Gradio's run history, analytics and MCP server are not started.
``--allow-path DIR`` (or ``STUDIO_ALLOWED_PATHS``) lets users name files and output folders in DIR
besides the studio home.  This file only composes tabs.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from studio.runs import runs_root, studio_home  # noqa: E402


# Answer tables keep every model's column in view: columns share the width and long texts wrap.  A cell's line
# breaks (a prompt's input below its instruction, an answer's lines) stay line breaks: Gradio's Dataframe draws
# the visible cells as [role=gridcell] spans with white-space: normal, and measures row heights in a hidden
# table's td cells, so both get pre-wrap (or the rows would be measured one line short).
ANSWER_TABLES = ("#pg-compare-table", "#eval-best", "#eval-worst")
TEXT_TABLES = (*ANSWER_TABLES, "#train-samples")  # the Train tab's answers at each evaluation: its own widths
CSS = "\n".join([
    ", ".join(f"{t} table" for t in ANSWER_TABLES) + " { table-layout: fixed; width: 100%; }",
    ", ".join(f"{t} td, {t} [role=gridcell] .text" for t in TEXT_TABLES)
    + " { white-space: pre-wrap; overflow-wrap: anywhere; }",
    # A row reads from the top: a short prompt beside a long answer starts on the answer's first line.
    ", ".join(f"{t} [role=gridcell] .cell-wrap" for t in TEXT_TABLES) + " { align-items: flex-start; }",
])


def build_app(ctx=None):
    import gradio as gr

    from studio.ui import data, evaluate, export, playground, presets, stage, state, train
    from studio.ui.context import UIContext

    ctx = ctx or UIContext()
    # No analytics: the studio sends nothing anywhere but to the browsers it serves.
    with gr.Blocks(title="QLoRA Studio", fill_width=True, analytics_enabled=False) as demo:
        gr.Markdown("# QLoRA Studio\nData → preset → train → chat → evaluate → export, on one GPU or the offline demo.")
        with gr.Tabs() as tabs:
            with gr.Tab("1 · Data", id="data"):
                data_ui = data.build(ctx)
            with gr.Tab("2 · Presets", id="presets"):
                presets_ui = presets.build(ctx)
            with gr.Tab("3 · Train", id="train"):
                train_ui = train.build(ctx, data_ui, presets_ui)
            with gr.Tab("4 · Playground", id="playground"):
                playground_ui = playground.build(ctx)
            with gr.Tab("5 · Evaluate", id="evaluate"):
                evaluate_ui = evaluate.build(ctx)
            with gr.Tab("6 · Export", id="export"):
                export_ui = export.build(ctx)
        # The Data tab's token preview follows the base model chosen on the Presets tab.
        data.link_base_model(data_ui, presets_ui.base_model, presets_ui.base)
        # What the user chose lives in one server-side draft: saved on every edit, restored on every page load.
        state.wire(ctx, data_ui, presets_ui, train_ui)
        # Run lists everywhere follow the runs folder (a run that finished, a checkpoint deleted).
        state.follow_lists(ctx, playground_ui, evaluate_ui, export_ui)
        # The Playground's "Train on these votes" opens the Train tab's preference stage on that run.
        stage.link_playground(playground_ui, train_ui.stage, tabs, ctx)
    return demo


class LaunchError(SystemExit):
    pass


def auth_from(arg: str | None) -> tuple[str, str] | None:
    if arg:
        if ":" not in arg:
            raise LaunchError("--auth takes user:password")
        user, pw = arg.split(":", 1)
        return user, pw
    user, pw = os.environ.get("STUDIO_USERNAME", ""), os.environ.get("STUDIO_PASSWORD", "")
    if pw:
        return user or "admin", pw
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def launch_kwargs(host: str, port: int, share: bool, auth) -> dict:
    """The keyword arguments for ``launch``; refuses exposure without a password."""
    if (share or not is_loopback(host)) and not auth:
        raise LaunchError(f"refusing to serve on {'a share link' if share else host} without a password: "
                          "pass --auth user:password or set STUDIO_PASSWORD.")
    if auth and len(auth[1]) < 8:
        raise LaunchError("the password must have at least 8 characters.")
    from studio.ui.gate import gate_middleware
    from studio.ui import http_errors

    home = studio_home()
    return dict(server_name=host, server_port=port, share=share, auth=auth,
                allowed_paths=[str(runs_root())], blocked_paths=[str(home / "presets"), str(ROOT / ".git")],
                max_file_size=os.environ.get("STUDIO_MAX_UPLOAD_MB", "1024") + "mb", show_error=False,
                # Gradio features the studio does not use are not started: run history (it kept every call's
                # inputs, a typed Hub token included, in the browser's localStorage, and its routes used the
                # server's HF_TOKEN), the MCP server, monitoring, the PWA files and server-side rendering.
                run_history=False, mcp_server=False, enable_monitoring=False, pwa=False, ssr_mode=False,
                footer_links=["api", "gradio", "settings"], css=CSS,
                app_kwargs={"openapi_url": None,
                            "middleware": gate_middleware(loopback=is_loopback(host) and not share),
                            "exception_handlers": http_errors.handlers()})  # a full disk in words, not a 500


def allow_paths(paths: list[str] | None) -> None:
    """Add ``--allow-path`` folders to ``STUDIO_ALLOWED_PATHS`` (the workers inherit it)."""
    from studio.security import ALLOW_ENV

    extra = []
    for raw in paths or []:
        p = Path(raw).expanduser()
        if not p.is_absolute() or not p.is_dir() or p.resolve() == Path(p.anchor):
            raise LaunchError(f"--allow-path {raw}: give an existing folder by its absolute path (not /).")
        extra.append(str(p.resolve()))
    if extra:
        old = [x for x in os.environ.get(ALLOW_ENV, "").split(os.pathsep) if x]
        os.environ[ALLOW_ENV] = os.pathsep.join(old + extra)


def main(argv=None, block: bool = True):
    """Parse the command line and serve; with ``block=False`` return the running ``Blocks`` (tests close it)."""
    p = argparse.ArgumentParser(description="QLoRA Studio")
    in_space = bool(os.environ.get("SPACE_ID"))
    p.add_argument("--host", default=os.environ.get("STUDIO_HOST", "0.0.0.0" if in_space else "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", os.environ.get("STUDIO_PORT", 7860))))
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (needs --auth)")
    p.add_argument("--auth", help="user:password required to open the studio (STUDIO_PASSWORD keeps it off the "
                   "process list)")
    p.add_argument("--allow-path", action="append", metavar="DIR",
                   help="a folder users may name for data, models and output folders, besides the studio home "
                        "(repeatable; also STUDIO_ALLOWED_PATHS, separated by ':')")
    a = p.parse_args(argv)
    try:
        allow_paths(a.allow_path)
        kw = launch_kwargs(a.host, a.port, a.share, auth_from(a.auth))
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if a.auth:
        print("note: --auth shows the password in the process list; STUDIO_PASSWORD keeps it private.", file=sys.stderr)
    # The login lives in the server from here on: training workers and anything else the app starts never see it.
    os.environ.pop("STUDIO_PASSWORD", None)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(studio_home() / "gradio_tmp"))
    from studio.security import CONFINE_ENV

    os.environ[CONFINE_ENV] = "1"  # model folders a browser names: studio folders or --allow-path only (workers too)
    runs_root().mkdir(parents=True, exist_ok=True)
    demo = build_app().queue(default_concurrency_limit=4)
    demo.launch(prevent_thread_lock=not block, quiet=not block, **kw)
    return demo


if __name__ == "__main__":
    main()
