"""Finding a backbone's transformer blocks, for injectors that hook into them.

Transformers keeps the blocks in differently named lists (``model.layers`` for
Llama/Qwen2/Mistral, ``model.decoder.layers`` for OPT, ``transformer.h`` for
GPT-2-style models). Rather than a table of names, take the ``nn.ModuleList``
whose length equals the config's layer count, preferring the decoder side.
"""

from __future__ import annotations

from torch import nn


def transformer_blocks(backbone: nn.Module, num_layers: int) -> nn.ModuleList:
    """The ``nn.ModuleList`` of `num_layers` blocks inside `backbone` (the decoder's for encoder-decoder models)."""
    found = [(name, mod) for name, mod in backbone.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) == num_layers and num_layers > 0]
    if not found:
        raise ValueError(f"no list of {num_layers} transformer blocks found in {type(backbone).__name__}; "
                         "this backbone cannot take injectors")
    decoder = [f for f in found if "decoder" in f[0]]
    return (decoder or found)[0][1]


def hidden_states_arg(args: tuple, kwargs: dict) -> tuple[str | int, object]:
    """Where a block's call put its hidden states: positional 0 or the ``hidden_states`` keyword."""
    if args:
        return 0, args[0]
    return "hidden_states", kwargs["hidden_states"]
