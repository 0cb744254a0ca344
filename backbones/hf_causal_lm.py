"""Backbone over any transformers decoder-only causal LM: from a config dict, a local folder or a GGUF file.

Llama/Vicuna, Qwen2, Mistral, OPT, Phi, GLM (ChatGLM-like), and mixture-of-experts
models (Mixtral, Qwen2-MoE) all come through ``AutoModelForCausalLM``; see
`mmhub.backbones.hf_base` for the shared settings (source, tokenizer, dtype,
rope_scaling). A mixture-of-experts model's training forward also computes its
load-balancing router loss (`mmhub.backbones.moe`), which `MMModel` adds to the loss.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Any, ClassVar, Iterator

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig

from mmhub.activation_checkpointing import is_checkpointed
from mmhub.backbones import moe, mrope
from mmhub.backbones.hf_base import HFBackboneBase, HFBackboneConfig
from mmhub.backbones.visual_expert import cogvlm_position_ids
from mmhub.errors import InputError
from mmhub.hf_attention import HF_SDPA, HF_XFORMERS
from mmhub.interfaces import BuildContext, ComponentConfig

HFCausalLMConfig = HFBackboneConfig  # kept as the public name of this backbone's settings


def generation_config(kwargs: dict[str, Any]) -> GenerationConfig:
    """mmhub's generation keywords (popped from `kwargs`) -> a transformers GenerationConfig."""
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature, top_p = kwargs.pop("temperature", 1.0), kwargs.pop("top_p", 1.0)
    return GenerationConfig(max_new_tokens=kwargs.pop("max_new_tokens", 64), do_sample=do_sample,
                            temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
                            top_k=None, eos_token_id=kwargs.pop("eos_token_id", None),
                            pad_token_id=kwargs.pop("pad_token_id", None), use_cache=True,
                            suppress_tokens=kwargs.pop("suppress_tokens", None))


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    """The KV-cache keyword of a transformers base model's forward: transformers 5 renamed `past_key_values` to
    `cache` (the old name warns); older releases know only the old one. Looked up once per class, off the hot path."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class HFCausalLM(HFBackboneBase):
    """Any transformers causal LM (Llama/Vicuna, Qwen2, Mistral, OPT, Phi, GLM, Mixtral), frozen, full or LoRA."""

    name: ClassVar[str] = "hf_causal_lm"
    Config: ClassVar[type[ComponentConfig]] = HFBackboneConfig
    auto_class: ClassVar[Any] = AutoModelForCausalLM
    library: ClassVar[str] = "transformers"
    out_dim_doc: ClassVar[str] = "the model's hidden_size"
    supports_packing: ClassVar[bool] = True  # forward takes a (B, 1, L, L) mask: packed rows (mmhub.packing)
    supports_step: ClassVar[bool] = True  # step(): mmhub's own KV-cached decode loop
    tokens_doc: ClassVar[str] = "text tokens; context = max_position_embeddings (x rope_scaling.factor)"
    example_settings: ClassVar[dict[str, Any]] = {"config": {
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256}}

    def __init__(self, config: HFBackboneConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self._softcap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        self.routing = moe.routing_of(self.model.config.get_text_config(), config.router_aux_loss_coef)

    @classmethod
    def hf_config(cls, config: HFBackboneConfig, ctx: BuildContext) -> Any:
        cfg = super().hf_config(config, ctx)
        mrope.register_causal_lm(cfg)  # M-RoPE text models (Qwen2-VL's) ship without a causal-LM class
        return cfg

    @property
    def grid_positions(self) -> bool:
        """M-RoPE models (rope_parameters.mrope_section: Qwen2-VL's text model) place media tokens by their grid;
        ``media_positions: cogvlm`` places them as CogVLM does."""
        return self.config.media_positions != "sequential" or mrope.is_mrope(self.model.config.get_text_config())

    def media_position_ids(self, attention_mask: torch.Tensor,
                           spans: list[tuple[int, int, tuple[int, int, int]]]) -> torch.Tensor:
        """(3, B, L) M-RoPE position ids (`mmhub.backbones.mrope`), or (B, L) CogVLM positions
        (`mmhub.backbones.visual_expert.cogvlm_position_ids`)."""
        if self.config.media_positions == "cogvlm":
            return cogvlm_position_ids(attention_mask, spans)
        return mrope.mrope_position_ids(attention_mask, spans)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`attention_mask`: (B, L) padding mask, or (B, 1, L, L) with True = attend (packed rows), which transformers
        uses as is: SDPA (and mmhub_xformers) take it boolean, every other implementation additive; or None for
        packed rows under mmhub's SDPA attention (`mmhub.hf_attention`: segments run on their own).
        A mixture-of-experts model in training mode with gradients on sets ``router_loss``: the coefficient times
        the load-balancing loss of this forward's routing (`mmhub.backbones.moe`; padding left out of a (B, L)
        mask); None otherwise."""
        r = self.routing
        route = r is not None and r.coef > 0 and self.training and torch.is_grad_enabled()
        out = self.model.base_model(inputs_embeds=inputs_embeds, attention_mask=self._mask(attention_mask,
                                    inputs_embeds.dtype), position_ids=position_ids, use_cache=False,
                                    **({"output_router_logits": True} if route else {}))
        self.router_loss = None
        if route:
            balance = moe.load_balancing_loss(out.router_logits, r.num_experts, r.top_k,
                                              moe.real_positions(attention_mask))
            self.router_loss = r.coef * balance
        return out.last_hidden_state  # (B, L, H)

    def _mask(self, attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """A (B, 1, Lq, Lk) boolean mask as this model's attention takes it (SDPA and mmhub_xformers: boolean, every
        other implementation additive); a (B, L) padding mask as it is; None (packed rows under mmhub's SDPA, whose
        segments need none) as it is. A prefix-LM's mask longer than a sliding-window model's window is refused: it
        would reach past the window in the sliding-window layers."""
        if attention_mask is None:
            return None
        if self.prefix_lm and attention_mask.ndim == 4:
            self._check_window(attention_mask.shape[-1])
        if attention_mask.ndim == 4 and attention_mask.dtype == torch.bool \
                and self.model.config._attn_implementation not in ("sdpa", HF_SDPA, HF_XFORMERS):
            additive = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
            attention_mask = additive.masked_fill_(~attention_mask, torch.finfo(dtype).min)
        return attention_mask

    def _check_window(self, length: int) -> None:
        cfg = self.model.config.get_text_config()
        window = getattr(cfg, "sliding_window", None)
        if window and "sliding_attention" in (getattr(cfg, "layer_types", None) or ()) and length > window:
            raise InputError(f"{length} positions with prefix-LM attention exceed the {cfg.model_type} sliding window "
                             f"of {window}: mmhub's prefix-LM mask is not windowed for the sliding-window layers; keep "
                             f"prompt and answer within {window} tokens")

    @contextmanager
    def only_at(self, needed: torch.Tensor) -> Iterator[bool]:
        """While active, `forward` may leave the final hidden states wrong wherever `needed` (B, L) is False: the
        last layer's MLP, which works position by position, runs only at the needed positions (the MLP is about
        three quarters of a Llama layer's weights; in a training step only labelled positions reach the LM head).
        Yields whether it applies: a dense MLP as the last layer's ``mlp`` (not a mixture of experts, whose routing
        could see the batch) and no gradient checkpointing (its recomputation would run outside this context)."""
        mlp = self._last_mlp()
        checkpointing = getattr(self.model, "is_activation_checkpointing", None)  # transformers < 5: the old name
        if checkpointing is None:
            checkpointing = getattr(self.model, "is_gradient_checkpointing", False)
        checkpointing = checkpointing or any(is_checkpointed(m) for m in self.model.modules())
        if mlp is None or checkpointing or not bool((~needed).any()):
            yield False
            return
        state: dict[str, Any] = {}

        def gather(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            x = args[0]
            if x.shape[:2] != needed.shape:
                return None
            state["shape"], state["at"] = x.shape, needed.to(x.device)
            return (x[state["at"]][None], *args[1:])

        def scatter(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            shape = state.pop("shape", None)
            if shape is None:
                return None
            return out.new_zeros(shape).index_put((state.pop("at"),), out[0])

        hooks = [mlp.register_forward_pre_hook(gather), mlp.register_forward_hook(scatter)]
        try:
            yield True
        finally:
            for h in hooks:
                h.remove()

    def _last_mlp(self) -> nn.Module | None:
        """The last decoder layer's dense MLP (Llama, Mistral, Qwen2/3, Gemma, Phi-3 ... name it ``mlp``), or None."""
        if "_last_mlp_ref" not in self.__dict__:  # a tuple, so the MLP is not registered a second time (state dict)
            n = self.model.config.get_text_config().num_hidden_layers
            layers = [m for m in self.model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
            mlp = getattr(layers[-1][-1], "mlp", None) if layers else None
            dense = mlp is not None and not any(hasattr(mlp, a) for a in ("experts", "gate", "router"))
            self._last_mlp_ref = (mlp if dense else None,)
        return self._last_mlp_ref[0]

    def step(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
             cache: Any = None) -> tuple[torch.Tensor, Any]:
        """One incremental forward with a KV cache (mmhub's own decode loop, `mmhub.decoding`).

        `attention_mask` (B, past + L) covers the cached and the new positions (or, on the first call, a
        (B, 1, L, L) boolean mask: a prefix-LM's prompt); returns the new positions' hidden states (B, L, H) and the
        cache to pass next time (created when None)."""
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
        base = self.model.base_model
        name = _cache_argument(type(base))
        out = base(inputs_embeds=inputs_embeds, attention_mask=self._mask(attention_mask, inputs_embeds.dtype),
                   position_ids=position_ids, use_cache=True, **{name: cache})
        return out.last_hidden_state, getattr(out, name)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        gen = generation_config(kwargs)
        return self.model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   generation_config=gen, **kwargs)
