"""The Gradio studio: one module per tab, each with ``build(...)`` returning a dataclass of its components.

Only this package and ``app.py`` import gradio.  Tabs read and write through the engine
(``studio.*``) and draw runs only from their folders.
"""
