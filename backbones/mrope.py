"""Multimodal rotary positions (M-RoPE, Qwen2-VL / Qwen2.5-VL) for the transformers causal-LM backbone.

M-RoPE splits each attention head's rotary frequencies into temporal, height and width sections
(``rope_parameters.mrope_section``), each rotated by its own position id, so positions are (3, B, L). Text tokens
have the same id in all three (so a text-only sequence is ordinary RoPE); the tokens of a media item with an
LLM-token grid (t, h, w) start at the position the next text token would have had, ``p``, and take
``p + (i_t, i_h, i_w)`` by their place in the grid (row-major over t, h, w); the text after the item continues at
``p + max(h, w)`` (Qwen2-VL's ``get_rope_index``). Decoding continues from the last position + 1 in all three.

transformers ships these text models (``qwen2_vl_text``, ``qwen2_5_vl_text``) only as base models inside the VLM
class; `register_causal_lm` gives them the standard causal-LM head (the base model + a linear ``lm_head``, tied to
the input embeddings when the config says so), registered with ``AutoModelForCausalLM``, so ``hf_causal_lm`` drives
them like any other LLM. Their rotary code is transformers' own and takes (3, B, L) position ids.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import torch

MROPE_TYPES = {"qwen2_vl_text": "qwen2_vl", "qwen2_5_vl_text": "qwen2_5_vl"}


def is_mrope(cfg: Any) -> bool:
    """Whether a transformers text config uses multimodal rotary positions (its rope_parameters has mrope_section)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    return cfg.model_type in MROPE_TYPES or "mrope_section" in params


@lru_cache(maxsize=None)
def _causal_lm_class(model_type: str) -> type:
    """A ``<Family>TextForCausalLM`` over transformers' M-RoPE text model of `model_type`."""
    import importlib

    from torch import nn
    from transformers import GenerationMixin
    from transformers.modeling_outputs import CausalLMOutputWithPast

    family = MROPE_TYPES[model_type]
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    prefix = "Qwen2VL" if family == "qwen2_vl" else "Qwen2_5_VL"
    base_cls, pretrained = getattr(modeling, f"{prefix}TextModel"), getattr(modeling, f"{prefix}PreTrainedModel")

    class TextForCausalLM(pretrained, GenerationMixin):
        """The M-RoPE text model with a linear LM head (no vision tower)."""

        config_class = base_cls.config_class
        base_model_prefix = "model"
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

        def __init__(self, config: Any):
            super().__init__(config)
            self.model = base_cls(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, cache: Any = None,
                    inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                    logits_to_keep: int = 0, **kwargs: Any) -> CausalLMOutputWithPast:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
            hidden = out.last_hidden_state
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            return CausalLMOutputWithPast(logits=self.lm_head(hidden), cache=out.cache)

    TextForCausalLM.__name__ = TextForCausalLM.__qualname__ = f"{prefix}TextForCausalLM"
    return TextForCausalLM


def register_causal_lm(cfg: Any) -> None:
    """Make ``AutoModelForCausalLM`` build `cfg` when it is an M-RoPE text config transformers has no head for."""
    if cfg.model_type not in MROPE_TYPES:
        return
    from transformers import AutoModelForCausalLM

    cls = _causal_lm_class(cfg.model_type)
    if type(cfg) not in AutoModelForCausalLM._model_mapping:
        AutoModelForCausalLM.register(type(cfg), cls, exist_ok=True)


def mrope_position_ids(attention_mask: torch.Tensor, spans: Sequence[tuple[int, int, tuple[int, int, int]]]
                       ) -> torch.Tensor:
    """(B, L) attention mask + media spans (row, first position in the row, LLM-token grid (t, h, w)) -> (3, B, L)
    M-RoPE position ids (padding positions hold 0 in the first rows' places; nothing attends to them)."""
    mask = attention_mask.long()
    out = ((mask.cumsum(1) - 1).clamp(min=0) * mask)[None].repeat(3, 1, 1)  # text-only positions
    for row, start, (t, h, w) in sorted(spans):
        n = t * h * w
        base = out[0, row, start]  # the position the next text token would have had
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        out[:, row, start:start + n] = grid.reshape(3, n).to(out) + base
        out[:, row, start + n:] += max(h, w) - n  # the text after the item continues at base + max(h, w)
    if mask.shape[1]:
        out = out * mask[None]
    return out
