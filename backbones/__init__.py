"""Built-in LLM backbones (installed as ``mmhub.backbones``)."""
