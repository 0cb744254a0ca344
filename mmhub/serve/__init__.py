"""`mmhub serve`: an OpenAI-compatible multimodal API over one continuous-batching engine.

`mmhub.serve.engine` decodes a running batch that requests join and leave between steps; `mmhub.serve.app` is
the FastAPI app (chat completions, streaming, models, health, metrics); `mmhub.serve.content` turns OpenAI
message parts into the model's messages and media; `mmhub.serve.kv` edits the KV cache's batch;
`mmhub.serve.cli` is the command.
"""
