"""`mmhub serve`: an OpenAI-compatible multimodal API over one continuous-batching engine.

`mmhub.serve.engine` decodes a running batch that requests join and leave between steps (`mmhub.serve.types`:
requests, events, errors; `mmhub.serve.kv`: the KV cache's batch surgery); `mmhub.serve.local` drives it in
process (the Gradio demo); `mmhub.serve.app` is the FastAPI app (chat completions, streaming, models, health,
metrics) and `mmhub.serve.content` turns OpenAI message parts into the model's messages and media
(`mmhub.serve.protocol`: the request body and errors); `mmhub.serve.cli` is the command.
"""
