"""No event of the studio's page has two "always_last" listeners.

Why: Gradio's page (6.x, ``Blocks`` dispatch) holds back an "always_last" listener triggered while it is still
running, and when it finishes sends the whole event again: every listener of that event, not only the one held
back.  With two such listeners on one event (say the Presets tab's changes and its fit, both on a number box's
``input``), each restart finds the other still running and holds it back in turn, so they restart each other
for ever: the panels stay busy long after the last keystroke and the server computes them again and again, and
a panel may end on values read halfway through a later action (a preset just saved).  A step that must follow an
edit chains ``.then(..., trigger_mode="always_last")`` on the one listener instead; a chained step, and a
``gr.State``'s change, is sent again alone.

The check reads the served page's own configuration, so it holds for every tab and for the composed app.
"""

from __future__ import annotations

from collections import defaultdict

# Sent again one listener at a time, never as a whole event: chained steps, page load, a State's change.
PER_LISTENER = {"then", "success", "failure", "load"}


def always_last_listeners(config: dict) -> dict[str, list[str]]:
    """``"<elem_id or type> <event>"`` -> the "always_last" listeners of that event, where there are several."""
    components = {c["id"]: c for c in config["components"]}
    found: dict[tuple, list[str]] = defaultdict(list)
    for dep in config["dependencies"]:
        if dep.get("trigger_mode") != "always_last":
            continue
        for target, event in dep["targets"]:
            comp = components.get(target, {})
            if event in PER_LISTENER or comp.get("type") == "state":
                continue
            found[(target, event)].append(dep.get("api_name") or str(dep.get("id")))
    return {f"{components.get(t, {}).get('props', {}).get('elem_id') or components.get(t, {}).get('type')} {e}": v
            for (t, e), v in found.items() if len(v) > 1}


def test_no_event_of_the_app_has_two_always_last_listeners(tiny_model_dir):
    import app

    demo = app.build_app()
    config = demo.get_config_file()
    assert config["dependencies"], "the app registered no listeners: the check would prove nothing"
    assert always_last_listeners(config) == {}


def test_the_check_finds_two_always_last_listeners_of_one_event():
    import gradio as gr

    with gr.Blocks() as demo:
        box, a, b, c = gr.Number(elem_id="box"), gr.Markdown(), gr.Markdown(), gr.State(0)
        box.input(lambda v: v, box, a, trigger_mode="always_last")
        box.input(lambda v: v, box, b, trigger_mode="always_last")
        box.change(lambda v: v, box, a).then(lambda v: v, box, b, trigger_mode="always_last")  # one each: fine
        c.change(lambda v: v, c, a)
        c.change(lambda v: v, c, b)  # a State's change is sent per listener: fine
    found = always_last_listeners(demo.get_config_file())
    assert list(found) == ["box input"] and len(found["box input"]) == 2
