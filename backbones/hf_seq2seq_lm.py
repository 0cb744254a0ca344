"""Backbone over a transformers encoder-decoder LM (Flan-T5, UL2, BART-style): media go to the encoder side.

`MMModel` sends the prompt (system/user text with the projected media tokens) to the
encoder and the answer tokens to the decoder (teacher-forced, shifted right behind
``decoder_start_token_id``), as BLIP-2's Flan-T5 variant and PaLI-X do. Generation
runs transformers' encoder-decoder ``generate`` from the encoder's input
embeddings. Shared settings: `mmhub.backbones.hf_base`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from transformers import AutoModelForSeq2SeqLM, PretrainedConfig

from mmhub.backbones.hf_base import HFBackboneBase, HFBackboneConfig
from mmhub.backbones.hf_causal_lm import generation_config
from mmhub.interfaces import BuildContext, ComponentConfig


class HFSeq2SeqLMConfig(HFBackboneConfig):
    """Settings of `HFSeq2SeqLM`: T5's relative positions state no context, so it is a setting."""

    context_length: int = Field(512, gt=0, description="encoder input budget in tokens (T5 was trained at 512)")


class HFSeq2SeqLM(HFBackboneBase):
    """Any transformers encoder-decoder LM (Flan-T5, UL2, mT5, BART): projected tokens feed the encoder."""

    name: ClassVar[str] = "hf_seq2seq_lm"
    Config: ClassVar[type[ComponentConfig]] = HFSeq2SeqLMConfig
    auto_class: ClassVar[Any] = AutoModelForSeq2SeqLM
    library: ClassVar[str] = "transformers"
    out_dim_doc: ClassVar[str] = "the model's d_model"
    tokens_doc: ClassVar[str] = "encoder tokens up to context_length (or the config's max positions)"
    example_settings: ClassVar[dict[str, Any]] = {"config": {
        "model_type": "t5", "d_model": 32, "d_ff": 64, "d_kv": 8, "num_layers": 2, "num_decoder_layers": 2,
        "num_heads": 4, "vocab_size": 300}}

    @classmethod
    def context_length(cls, cfg: PretrainedConfig) -> int:
        try:
            return super().context_length(cfg)
        except ValueError:
            return int(getattr(cfg, "_mmhub_context", 512))

    @classmethod
    def hf_config(cls, config: HFSeq2SeqLMConfig, ctx: BuildContext) -> PretrainedConfig:
        cfg = super().hf_config(config, ctx)
        if not getattr(cfg, "is_encoder_decoder", False):
            raise ValueError(f"{cfg.model_type} is not an encoder-decoder model; use hf_causal_lm for decoder-only LMs")
        cfg._mmhub_context = config.context_length
        return cfg

    def __init__(self, config: HFSeq2SeqLMConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        cfg = self.model.config
        # T5 rescales decoder outputs by d_model**-0.5 before a tied LM head; logits() must do the same
        self._scale = cfg.d_model ** -0.5 if getattr(cfg, "scale_decoder_outputs", False) else None

    @property
    def decoder_start_token_id(self) -> int:
        cfg = self.model.config
        start = getattr(cfg, "decoder_start_token_id", None)
        return int(start if start is not None else cfg.pad_token_id or 0)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Encoder embeddings (B, Le, H) + decoder ids (B, Ld) -> decoder hidden states (B, Ld, H)."""
        if decoder_input_ids is None:
            decoder_input_ids = torch.full((inputs_embeds.shape[0], 1), self.decoder_start_token_id,
                                           device=inputs_embeds.device)
        enc = self.model.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        dec = self.model.get_decoder()(input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
                                       encoder_hidden_states=enc.last_hidden_state,
                                       encoder_attention_mask=attention_mask,
                                       use_cache=False)
        return dec.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._scale is not None:
            hidden = hidden * self._scale
        return self.model.get_output_embeddings()(hidden)

    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        gen = generation_config(kwargs)
        gen.decoder_start_token_id = self.decoder_start_token_id
        out = self.model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, generation_config=gen,
                                  **kwargs)
        return out[:, 1:]  # drop the decoder start token
