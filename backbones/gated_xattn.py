"""Flamingo's tanh-gated cross-attention layers, injected before every k-th block of a frozen LM.

Each injected layer lets the text tokens attend to the visual tokens (the
perceiver resampler's latents) of the *latest* media item at or before them, as
Flamingo does (``only_attend_immediate_media``); tokens before any item get no
attention update. Both the attention and the feed-forward output are scaled by
``tanh(gate)`` with gates initialised at 0, so at the start of training the LM
computes exactly what it did without the layers. In the text, each item keeps one
learned marker token (Flamingo's ``<image>``). The layers hook onto the blocks
with forward pre-hooks: the backbone's own modules and state dict are unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from mmhub.attention import MultiheadAttention
from mmhub.backbones.layers import hidden_states_arg, transformer_blocks
from mmhub.interfaces import (
    Backbone,
    BackboneFacts,
    BuildContext,
    ComponentConfig,
    Injector,
    InjectorConfig,
    InjectorFacts,
)


class GatedXAttnConfig(InjectorConfig):
    """Settings of `GatedCrossAttention`."""

    modalities: list[str] = Field(default_factory=lambda: ["image"], min_length=1)
    every: int = Field(1, ge=1, description="a gated layer before every k-th LM block (Flamingo-9B: 4)")
    heads: int = Field(8, ge=1)
    ff_mult: int = Field(4, ge=1)
    only_immediate: bool = Field(True, description="attend only to the latest item before each token (else to all)")


class GatedXAttnLayer(nn.Module):
    """LayerNorm -> cross-attention to media -> tanh gate; LayerNorm -> FFN -> tanh gate."""

    def __init__(self, dim: int, heads: int, ff_mult: int, backend: str):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiheadAttention(dim, heads, backend=backend)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult), nn.GELU(),
                                nn.Linear(dim * ff_mult, dim))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: torch.Tensor, valid: torch.Tensor, index: torch.Tensor,
                only_immediate: bool) -> torch.Tensor:
        """x (B, L, H); media (B, M, T, H); valid (B, M); index (B, L) latest item per position (-1: none)."""
        B, M, T, H = media.shape
        keys = media.reshape(B, M * T, H).to(x.dtype)
        item = torch.arange(M, device=x.device).repeat_interleave(T)  # (M*T,) item of each key
        ok = valid.repeat_interleave(T, dim=1)[:, None, :]  # (B, 1, M*T)
        if only_immediate:
            mask = (index[:, :, None] == item[None, None, :]) & ok  # (B, L, M*T)
        else:
            mask = (item[None, None, :] <= index[:, :, None]) & ok
        x = x + torch.tanh(self.attn_gate) * self.attn(self.norm(x), keys, mask)
        return x + torch.tanh(self.ff_gate) * self.ff(x)


class GatedCrossAttention(Injector):
    """Flamingo: tanh-gated cross-attention layers inserted into the LM every k blocks (media as context)."""

    name: ClassVar[str] = "gated_xattn"
    Config: ClassVar[type[ComponentConfig]] = GatedXAttnConfig
    modalities_in: ClassVar[tuple[str, ...]] = ("embeddings",)
    modalities_out: ClassVar[tuple[str, ...]] = ("hidden_states",)
    out_dim_doc: ClassVar[str] = "the backbone's hidden size (its blocks' width)"
    tokens_doc: ClassVar[str] = "1 marker token per media item in the text; the item's tokens are cross-attention keys"
    example_settings: ClassVar[dict[str, Any]] = {"modalities": ["image"], "every": 1, "heads": 4, "dim": 32,
                                                  "num_layers": 2}

    @classmethod
    def describe(cls, config: GatedXAttnConfig, ctx: BuildContext, backbone: BackboneFacts) -> InjectorFacts:
        if backbone.is_encoder_decoder:
            raise ValueError("gated cross-attention is for decoder-only LMs; this backbone is encoder-decoder")
        dim = config.dim or backbone.hidden_size
        if dim != backbone.hidden_size:
            raise ValueError(f"dim {dim} != backbone hidden size {backbone.hidden_size}")
        if dim % config.heads:
            raise ValueError(f"backbone hidden size {dim} is not divisible by heads {config.heads}")
        if backbone.num_layers < config.every:
            raise ValueError(f"every {config.every} > the backbone's {backbone.num_layers} layers: "
                             "no layer would be injected")
        return InjectorFacts(context_modalities=tuple(config.modalities))

    def __init__(self, config: GatedXAttnConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        if config.dim is None or config.num_layers is None:
            raise ValueError("dim and num_layers must be set (validation fills them from the backbone)")
        n = config.num_layers // config.every
        self.layers = nn.ModuleList(GatedXAttnLayer(config.dim, config.heads, config.ff_mult, ctx.attention)
                                    for _ in range(n))
        self.markers = nn.ParameterDict({m: nn.Parameter(torch.randn(config.dim) * 0.02) for m in config.modalities})
        self._handles: list[Any] = []

    def marker(self, modality: str) -> torch.Tensor:
        return self.markers[modality]

    def injected_blocks(self) -> list[int]:
        """Indices of the LM blocks that get a gated layer before them."""
        every = self.config.every
        return [i for i in range(self.config.num_layers) if (i + 1) % every == 0]

    def attach(self, backbone: Backbone) -> None:
        blocks = transformer_blocks(backbone, self.config.num_layers)
        for layer, i in zip(self.layers, self.injected_blocks(), strict=True):
            self._handles.append(blocks[i].register_forward_pre_hook(self._hook(layer), with_kwargs=True))

    def _hook(self, layer: GatedXAttnLayer) -> Any:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            ctx = self.context
            if ctx is None:
                return None
            where, x = hidden_states_arg(args, kwargs)
            for m in self.config.modalities:
                if m not in ctx.media:
                    continue
                index = ctx.media_index[m]
                if index.shape[1] != x.shape[1]:  # cached generation: new tokens follow the whole prompt
                    index = index[:, -1:].expand(-1, x.shape[1])
                x = layer(x, ctx.media[m], ctx.media_valid[m], index, self.config.only_immediate)
            if where == 0:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}
        return pre_hook
