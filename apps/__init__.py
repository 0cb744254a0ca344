"""Applications on top of the public API (installed as ``mmhub.apps``): the Gradio demo.

`demo` is the ``mmhub demo`` command, `ui` lays out the app, and `models`, `chat`,
`uploads`, `assemble` and `catalog` hold the logic each tab runs (tested without a browser).
"""
