"""``ColumnDropdown``: the Data tab's role -> column dropdowns.

Contract: drawn and picked exactly as Gradio's ``gr.Dropdown`` (``is_template``: the page uses Gradio's own
dropdown, nothing can be typed in); only the server's check of a sent value differs.  A value among the choices is
preprocessed as Gradio does; any other value is passed on as it is, for the handler to judge.

Why: a new source sets the choices in the server's session at once, while an event the page sent a moment earlier
(the page-load redraw, a role's change) may still carry the previous file's column.  ``gr.Dropdown`` would fail
that event ("not in the list of choices", an error toast) and stop the chain behind it; ``refresh`` and the Start
checks name a column the data lacks instead, and the next event draws anew.

Gradio writes a ``.pyi`` beside the module of every component class it sees; this module holds the class alone,
and its ``.pyi`` is kept in the repository and the wheel, so importing it finds the file as Gradio would write it
and writes nothing.
"""

from __future__ import annotations

import gradio as gr


class ColumnDropdown(gr.Dropdown):
    is_template = True

    def preprocess(self, payload):
        if payload is None or payload in [value for _, value in self.choices]:
            return super().preprocess(payload)
        return payload
