"""Applications on top of the public API (installed as ``mmhub.apps``). The Gradio demo is not
built yet; `mmhub demo` does not exist in this version."""
