"""Flamingo's tanh-gated cross-attention layers, injected before every k-th block of a frozen LM.

Each injected layer lets the text tokens attend to the visual tokens (the
perceiver resampler's latents) of the *latest* media item at or before them, as
Flamingo does (``only_attend_immediate_media``); tokens before any item get no
attention update. Both the attention and the feed-forward output are scaled by
``tanh(gate)`` with gates initialised at 0, so at the start of training the LM
computes exactly what it did without the layers. In the text, each item keeps one
learned marker token (Flamingo's ``<image>``). The layers hook onto the blocks
with forward pre-hooks: the backbone's own modules and state dict are unchanged.

``layout: idefics`` is IDEFICS's ``IdeficsGatedCrossAttentionLayer`` term for term: placed
before blocks 0, k, 2k, ... (``cross_layer_interval``), RMSNorm (``norm_eps``) -> cross-attention
(bias-free q from the LM width, k/v from ``kv_dim``-wide context tokens, optional per-head
RMSNorm on queries and keys) -> zeroed where a token attends to no item -> ``tanh(alpha)`` gate
(a scalar, or a vector per channel with ``gate: vector``), then RMSNorm -> the LLaMA MLP
(``ff_dim``, ``activation``) -> ``tanh(alpha_dense)``. Which item a token attends to is
IDEFICS's image_attention_mask: the latest item at or before it, and none after an end-of-sequence
token until the next item (``reset_token``, IDEFICS's packed documents). ``marker_token`` makes each
item's marker in the text the embedding of that vocabulary token (IDEFICS's ``<image>``)
instead of a learned vector.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from transformers.activations import ACT2FN

from mmhub.attention import MultiheadAttention, attention, merge_heads, split_heads
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
    layout: Literal["flamingo", "idefics"] = Field(
        "flamingo", description="flamingo: mmhub's layers (after every k-th block); idefics: IDEFICS's, exactly")
    kv_dim: int | None = Field(None, ge=1, description="idefics layout: width of the context tokens (default dim)")
    ff_dim: int | None = Field(None, ge=1, description="idefics layout: the MLP's inner width (default ff_mult x dim)")
    activation: str = Field("silu", description="idefics layout: the MLP's activation (a transformers hidden_act)")
    norm_eps: float = Field(1e-6, gt=0, description="idefics layout: the RMSNorms' epsilon")
    qk_norm: bool = Field(False, description="idefics layout: RMSNorm on each head's queries and keys")
    gate: Literal["float", "vector"] = Field("float", description="idefics layout: one gate value or one per channel")
    marker_token: str | None = Field(None, description="the items' marker is this vocabulary token's embedding "
                                                       "(IDEFICS: <image>) instead of a learned vector")
    reset_token: str | None = Field(None, description="after this token (IDEFICS: its end-of-sequence </s>) "
                                                      "positions attend to no item until the next item")


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
        mask = _item_mask(M, T, valid, index, only_immediate)  # (B, L, M*T)
        x = x + torch.tanh(self.attn_gate) * self.attn(self.norm(x), keys, mask)
        return x + torch.tanh(self.ff_gate) * self.ff(x)


class RMSNorm(nn.Module):
    """LLaMA/IDEFICS RMSNorm: x / rms(x) computed in float32, times a learned scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class IdeficsCrossAttention(nn.Module):
    """Text queries (LM width) over context keys/values (kv_dim), no biases, optional per-head q/k RMSNorm."""

    def __init__(self, dim: int, kv_dim: int, heads: int, qk_norm: bool, eps: float, backend: str):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(kv_dim, dim, bias=False)
        self.v = nn.Linear(kv_dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(dim // heads, eps) if qk_norm else None
        self.k_norm = RMSNorm(dim // heads, eps) if qk_norm else None

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, dim); context (B, K, kv_dim); mask (B, L, K), True = attend (an all-False row gives 0)."""
        q, k, v = (split_heads(f(t), self.heads) for f, t in ((self.q, x), (self.k, context), (self.v, context)))
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.out(merge_heads(attention(q, k, v, mask[:, None], self.backend)))


class IdeficsGatedLayer(nn.Module):
    """IDEFICS: RMSNorm -> cross-attention (zeroed without an item) -> tanh gate; RMSNorm -> LLaMA MLP -> tanh gate."""

    def __init__(self, config: GatedXAttnConfig, backend: str):
        super().__init__()
        dim = config.dim
        assert dim is not None
        ff_dim = config.ff_dim or dim * config.ff_mult
        gate_shape = (1, 1, dim) if config.gate == "vector" else (1,)
        self.norm = RMSNorm(dim, config.norm_eps)
        self.attn = IdeficsCrossAttention(dim, config.kv_dim or dim, config.heads, config.qk_norm, config.norm_eps,
                                          backend)
        self.attn_gate = nn.Parameter(torch.zeros(gate_shape))
        self.ff_norm = RMSNorm(dim, config.norm_eps)
        self.ff_gate_proj = nn.Linear(dim, ff_dim, bias=False)
        self.ff_up = nn.Linear(dim, ff_dim, bias=False)
        self.ff_down = nn.Linear(ff_dim, dim, bias=False)
        self.act = ACT2FN[config.activation]
        self.ff_gate = nn.Parameter(torch.zeros(gate_shape))

    def forward(self, x: torch.Tensor, media: torch.Tensor, valid: torch.Tensor, index: torch.Tensor,
                only_immediate: bool) -> torch.Tensor:
        """As `GatedXAttnLayer.forward`; media (B, M, T, kv_dim)."""
        B, M, T, C = media.shape
        keys = media.reshape(B, M * T, C).to(x.dtype)
        mask = _item_mask(M, T, valid, index, only_immediate)
        attended = self.attn(self.norm(x), keys, mask)
        attended = attended.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # tokens that attend to no item
        x = x + torch.tanh(self.attn_gate) * attended
        h = self.ff_norm(x)
        return x + torch.tanh(self.ff_gate) * self.ff_down(self.act(self.ff_gate_proj(h)) * self.ff_up(h))


def reset_after(index: torch.Tensor, token_ids: torch.Tensor, reset_id: int) -> torch.Tensor:
    """(B, L) latest-item indices -> -1 at positions after a `reset_id` token with no item starting in between
    (IDEFICS's processor: a token after ``</s>`` sees no image until the next ``<image>``)."""
    pos = torch.arange(index.shape[1], device=index.device).expand_as(index)
    start = torch.ones_like(index, dtype=torch.bool)  # where an item starts: its marker, where the index changes
    start[:, 1:] = index[:, 1:] != index[:, :-1]
    start[:, 0] = index[:, 0] >= 0
    last_start = torch.where(start, pos, -1).cummax(1).values
    last_reset = torch.where(token_ids == reset_id, pos, -1).cummax(1).values
    before = torch.cat([torch.full_like(last_reset[:, :1], -1), last_reset[:, :-1]], 1)  # strictly before
    return index.masked_fill(before > last_start, -1)


def _item_mask(M: int, T: int, valid: torch.Tensor, index: torch.Tensor, only_immediate: bool) -> torch.Tensor:
    """(B, L, M*T) True where a position may attend to a key: its latest item's (or every earlier item's) tokens."""
    item = torch.arange(M, device=index.device).repeat_interleave(T)  # (M*T,) item of each key
    ok = valid.repeat_interleave(T, dim=1)[:, None, :]  # (B, 1, M*T)
    if only_immediate:
        return (index[:, :, None] == item[None, None, :]) & ok
    return (item[None, None, :] <= index[:, :, None]) & ok


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
        idefics_only = [k for k in ("kv_dim", "ff_dim") if getattr(config, k) is not None]
        idefics_only += [k for k, default in (("qk_norm", False), ("gate", "float"), ("activation", "silu"),
                                              ("norm_eps", 1e-6)) if getattr(config, k) != default]
        if config.layout == "flamingo" and idefics_only:
            raise ValueError(f"{', '.join(idefics_only)} belong to layout idefics; fix: set layout: idefics or "
                             "leave them out")
        kv_dim = (config.kv_dim or dim) if config.layout == "idefics" else dim
        return InjectorFacts(context_modalities=tuple(config.modalities),
                             context_dims={m: kv_dim for m in config.modalities})

    def __init__(self, config: GatedXAttnConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        if config.dim is None or config.num_layers is None:
            raise ValueError("dim and num_layers must be set (validation fills them from the backbone)")
        n = config.num_layers // config.every
        self.layers: nn.ModuleList
        if config.layout == "idefics":
            self.layers = nn.ModuleList(IdeficsGatedLayer(config, ctx.attention) for _ in range(n))
        else:
            self.layers = nn.ModuleList(GatedXAttnLayer(config.dim, config.heads, config.ff_mult, ctx.attention)
                                        for _ in range(n))
        learned = config.modalities if config.marker_token is None else []
        self.markers = nn.ParameterDict({m: nn.Parameter(torch.randn(config.dim) * 0.02) for m in learned})
        self._handles: list[Any] = []
        self._backbone: list[Backbone] = []  # a plain list: the backbone is not a submodule of the injector

    def marker(self, modality: str) -> torch.Tensor:
        token = self.config.marker_token
        if token is None:
            return self.markers[modality]
        if not self._backbone:
            raise RuntimeError(f"gated_xattn marker_token {token!r}: the injector is not attached to a backbone yet")
        backbone = self._backbone[0]
        token_id = backbone.tokenizer.convert_tokens_to_ids(token)
        lm = backbone.language_model()
        rows = lm.get_input_embeddings().num_embeddings if lm is not None else None
        if not isinstance(token_id, int) or token_id == backbone.tokenizer.unk_token_id \
                or (rows is not None and token_id >= rows):
            raise ValueError(f"gated_xattn marker_token {token!r} is not a token of the backbone's embedding table "
                             f"(id {token_id}, table rows {rows}); fix: name a vocabulary token (IDEFICS: <image>) "
                             f"or leave marker_token out for a learned marker")
        ids = torch.tensor([[token_id]], device=self._device(backbone))
        return backbone.embed(ids)[0, 0]

    def _token_id(self, token: str) -> int:
        """The backbone tokenizer's id of `token`; ValueError naming the setting when it has none."""
        tokenizer = self._backbone[0].tokenizer if self._backbone else None
        token_id = tokenizer.convert_tokens_to_ids(token) if tokenizer is not None else None
        if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
            raise ValueError(f"gated_xattn reset_token {token!r} is not a token of the backbone's tokenizer (id "
                             f"{token_id}); fix: name one of its tokens (IDEFICS: its eos token) or leave it out")
        return token_id

    @staticmethod
    def _token_ids(ctx: Any) -> torch.Tensor:
        if ctx.token_ids is None:
            raise ValueError("gated_xattn reset_token needs the text's token ids in the injection context "
                             "(InjectionContext.token_ids), which this caller did not give")
        return ctx.token_ids

    @staticmethod
    def _device(backbone: Backbone) -> torch.device:
        return next(backbone.parameters()).device

    def injected_blocks(self) -> list[int]:
        """Indices of the LM blocks that get a gated layer before them (flamingo: after every k-th block, i.e.
        before blocks k-1, 2k-1, ...; idefics: before blocks 0, k, 2k, ...)."""
        every = self.config.every
        if self.config.layout == "idefics":
            return [i for i in range(self.config.num_layers) if i % every == 0][: len(self.layers)]
        return [i for i in range(self.config.num_layers) if (i + 1) % every == 0]

    def attach(self, backbone: Backbone) -> None:
        self._backbone[:] = [backbone]
        blocks = transformer_blocks(backbone, self.config.num_layers)
        for layer, i in zip(self.layers, self.injected_blocks(), strict=True):
            self._handles.append(blocks[i].register_forward_pre_hook(self._hook(layer), with_kwargs=True))

    def _hook(self, layer: nn.Module) -> Any:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            ctx = self.context
            if ctx is None:
                return None
            where, x = hidden_states_arg(args, kwargs)
            for m in self.config.modalities:
                if m not in ctx.media:
                    continue
                index = ctx.media_index[m]
                if self.config.reset_token is not None:
                    index = reset_after(index, self._token_ids(ctx), self._token_id(self.config.reset_token))
                if index.shape[1] != x.shape[1]:  # cached generation: new tokens follow the whole prompt
                    index = index[:, -1:].expand(-1, x.shape[1])
                # the layer computes in its own dtype (float32 beside a bfloat16 LM), the block gets the LM's back
                dtype = next(layer.parameters()).dtype
                x = layer(x.to(dtype), ctx.media[m], ctx.media_valid[m], index, self.config.only_immediate).to(x.dtype)
            if where == 0:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}
        return pre_hook
