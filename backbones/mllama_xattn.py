"""Llama-3.2-Vision's gated cross-attention layers, injected into a Llama LM that holds only the self-attention layers.

In Mllama the text model's layers listed in ``cross_attention_layers`` are cross-attention blocks
(MllamaCrossAttentionDecoderLayer). Here the LM is an ordinary Llama with the remaining (self-attention) layers, and
this injector runs each cross-attention block at its depth with forward hooks: the cross layer at stack position
``c`` of rank ``r`` among the cross layers runs before self layer ``c - r``, or after the last self layer when there
is none left. The math is transformers': RMSNorm -> cross-attention (query and key RMS-normed per head, grouped
key/value heads, no RoPE) to the image tokens -> ``tanh(attn_gate)``-scaled residual; RMSNorm -> SwiGLU MLP ->
``tanh(mlp_gate)``-scaled residual, the MLP output zeroed in rows that see no image.

Which image tokens a text position sees is Mllama's processor rule: the images of the latest run of consecutive
``<|image|>`` tokens at or before it (an image's own token included), only its real tiles (the encoder's
`token_mask`), and never a batch's padding slots. A position that sees no image (text before the first image)
attends with no mask at all, to every key of its sample's images (padding tiles included), as transformers does (it
zeroes the whole bias row); only its MLP branch is zeroed. Generated tokens see what the prompt's last token sees.
Each sample computes what transformers computes for it alone: in a batch whose samples hold different numbers of
images, transformers fills a shorter sample's missing image slots with a blank image's features, which that sample's
no-image rows then attend to, so its output there depends on its batch-mates; here those slots are never attended,
and a sample with no image at all gets no cross-attention update (transformers skips the layers for text alone).

Mllama's embedding table has ``vocab_size + 8`` rows; the LM keeps the first ``vocab_size`` (its head has as many
columns) and this injector keeps the 8 extra rows (``extra_rows``): the image token's row is the marker embedding
that stands for each image in the text, the others are reserved rows no token uses, kept so the table can be
written back whole.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from transformers.activations import ACT2FN

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


class MllamaXAttnConfig(InjectorConfig):
    """Settings of `MllamaCrossAttention` (an Mllama text config's cross-attention part)."""

    modality: str = "image"
    layers: list[int] = Field(min_length=1, description="cross-attention layers' positions in the whole stack "
                                                       "(transformers' cross_attention_layers)")
    heads: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    rms_norm_eps: float = Field(1e-5, gt=0)
    hidden_act: str = "silu"
    extra_rows: int = Field(8, ge=1, description="embedding rows past the vocabulary (Mllama: 8)")
    marker_row: int = Field(0, ge=0, description="which extra row is the image token's (image_token_index - vocab)")

    @field_validator("layers")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or min(value) < 0:
            raise ValueError(f"layers {value} must be distinct non-negative stack positions")
        return sorted(value)

    @field_validator("hidden_act")
    @classmethod
    def _known_act(cls, value: str) -> str:
        if value not in ACT2FN:
            raise ValueError(f"hidden_act {value!r} is not a transformers activation (e.g. silu, gelu)")
        return value


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in float32 (Llama's)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class CrossAttention(nn.Module):
    """Queries from the text, keys/values from the image tokens; per-head RMSNorm of queries and keys."""

    def __init__(self, dim: int, heads: int, kv_heads: int, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, L, H), keys (B, K, H), allowed (B, L, K) bool -> (B, L, H)."""
        B, L, _ = x.shape
        K = keys.shape[1]
        q = self.q_norm(self.q_proj(x).view(B, L, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(keys).view(B, K, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(keys).view(B, K, self.kv_heads, self.head_dim).transpose(1, 2)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=self.head_dim ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.heads * self.head_dim))


class GatedMLP(nn.Module):
    """Llama's SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MllamaXAttnLayer(nn.Module):
    """One Mllama cross-attention block (parameter names as transformers' MllamaCrossAttentionDecoderLayer)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, intermediate: int, eps: float, act: str):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.cross_attn = CrossAttention(dim, heads, kv_heads, eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = GatedMLP(dim, intermediate, act)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor,
                present: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, H); keys (B, K, H); allowed (B, L, K): which keys each position may see; present (B, K): the keys
        of the sample's own images (None: all). A row that may see none attends to every present key and gets no
        MLP update (transformers' full-text-row mask); a sample with no present key gets no update at all."""
        sees = allowed.any(-1)  # (B, L)
        if present is None:
            present = torch.ones_like(allowed[:, 0])
        mask = torch.where(sees[..., None], allowed, present[:, None, :])
        empty = ~mask.any(-1, keepdim=True)  # (B, L, 1): no image in the whole sample
        attn = self.cross_attn(self.input_layernorm(x), keys, mask | empty) * (~empty).to(x.dtype)
        x = x + self.cross_attn_attn_gate.tanh() * attn
        h = self.mlp(self.post_attention_layernorm(x)) * sees[..., None].to(x.dtype)
        return x + self.cross_attn_mlp_gate.tanh() * h


def attended_items(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) latest item at or before each position (-1: none) -> the first and last item each position sees:
    the latest run of consecutive image tokens (a position's index rises exactly at an item's marker token)."""
    prev = torch.cat([torch.full_like(index[:, :1], -1), index[:, :-1]], 1)
    marker = index > prev
    prev_marker = torch.cat([torch.zeros_like(marker[:, :1]), marker[:, :-1]], 1)
    start = marker & ~prev_marker
    first = torch.where(start, index, torch.full_like(index, -1)).cummax(1).values
    return first, index


def key_mask(index: torch.Tensor, valid: torch.Tensor, token_mask: torch.Tensor | None, T: int) -> torch.Tensor:
    """(B, L) latest item per position, (B, M) real items, (B, M, T) real tokens (None: all) -> (B, L, M*T) the keys
    each position may attend to."""
    first, last = attended_items(index)
    item = torch.arange(valid.shape[1], device=index.device)
    sees = (item >= first[..., None]) & (item <= last[..., None]) & valid[:, None, :]  # (B, L, M)
    tokens = token_mask if token_mask is not None else valid.new_ones(*valid.shape, T)
    return (sees[..., None] & tokens[:, None]).flatten(2)


class MllamaCrossAttention(Injector):
    """Llama-3.2-Vision: tanh-gated cross-attention blocks at their depth in a Llama LM (tiles' tokens as keys)."""

    name: ClassVar[str] = "mllama_xattn"
    Config: ClassVar[type[ComponentConfig]] = MllamaXAttnConfig
    modalities_in: ClassVar[tuple[str, ...]] = ("embeddings",)
    modalities_out: ClassVar[tuple[str, ...]] = ("hidden_states",)
    library: ClassVar[str] = "torch (mmhub)"
    out_dim_doc: ClassVar[str] = "the backbone's hidden size"
    tokens_doc: ClassVar[str] = "1 marker token (<|image|>) per image in the text; the image's tokens are keys"
    example_settings: ClassVar[dict[str, Any]] = {"layers": [1], "heads": 4, "kv_heads": 2, "intermediate_size": 64,
                                                  "dim": 32, "num_layers": 2}

    @classmethod
    def describe(cls, config: MllamaXAttnConfig, ctx: BuildContext, backbone: BackboneFacts) -> InjectorFacts:
        if backbone.is_encoder_decoder:
            raise ValueError("mllama_xattn is for decoder-only LMs; this backbone is encoder-decoder")
        dim = config.dim or backbone.hidden_size
        if dim != backbone.hidden_size:
            raise ValueError(f"dim {dim} != backbone hidden size {backbone.hidden_size}")
        if dim % config.heads or config.heads % config.kv_heads:
            raise ValueError(f"hidden size {dim}, heads {config.heads}, kv_heads {config.kv_heads}: heads must divide "
                             "the hidden size and kv_heads the heads")
        total = backbone.num_layers + len(config.layers)
        if config.layers[-1] >= total:
            raise ValueError(f"cross-attention layer {config.layers[-1]} is past the stack of {total} layers "
                             f"({backbone.num_layers} self-attention + {len(config.layers)} cross-attention)")
        if config.marker_row >= config.extra_rows:
            raise ValueError(f"marker_row {config.marker_row} is not one of the {config.extra_rows} extra rows")
        return InjectorFacts(context_modalities=(config.modality,))

    def __init__(self, config: MllamaXAttnConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        if config.dim is None or config.num_layers is None:
            raise ValueError("dim and num_layers must be set (validation fills them from the backbone)")
        self.layers = nn.ModuleList(
            MllamaXAttnLayer(config.dim, config.heads, config.kv_heads, config.intermediate_size,
                             config.rms_norm_eps, config.hidden_act) for _ in config.layers)
        self.extra_rows = nn.Parameter(torch.randn(config.extra_rows, config.dim) * 0.02)
        self._handles: list[Any] = []

    def marker(self, modality: str) -> torch.Tensor:
        return self.extra_rows[self.config.marker_row]

    def placement(self) -> list[tuple[str, int, list[int]]]:
        """Where the cross layers run: (``"before"`` / ``"after"``, self-attention block, ranks of the layers)."""
        n = self.config.num_layers
        spots: dict[tuple[str, int], list[int]] = {}
        for rank, pos in enumerate(self.config.layers):
            block = pos - rank
            spot = ("before", block) if block < n else ("after", n - 1)
            spots.setdefault(spot, []).append(rank)
        return [(where, block, ranks) for (where, block), ranks in spots.items()]

    def attach(self, backbone: Backbone) -> None:
        blocks = transformer_blocks(backbone, self.config.num_layers)
        for where, block, ranks in self.placement():
            if where == "before":
                self._handles.append(blocks[block].register_forward_pre_hook(self._pre_hook(ranks), with_kwargs=True))
            else:
                self._handles.append(blocks[block].register_forward_hook(self._post_hook(ranks)))

    def _run(self, ranks: list[int], x: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        m = self.config.modality
        if ctx is None or m not in ctx.media:
            return x  # text only: transformers skips the cross-attention layers
        media = ctx.media[m]  # (B, M, T, H)
        B, M, T, H = media.shape
        allowed = key_mask(ctx.media_index[m], ctx.media_valid[m], getattr(ctx, "media_mask", {}).get(m), T)
        if allowed.shape[1] != x.shape[1]:  # cached generation: new tokens see what the prompt's last token sees
            allowed = allowed[:, -1:].expand(-1, x.shape[1], -1)
        present = ctx.media_valid[m].repeat_interleave(T, dim=1)  # (B, M*T): keys of the sample's own images
        dtype = self.extra_rows.dtype  # the blocks compute in the injector's dtype, the LM's stays its own
        keys, h = media.reshape(B, M * T, H).to(dtype), x.to(dtype)
        for r in ranks:
            h = self.layers[r](h, keys, allowed, present)
        return h.to(x.dtype)

    def _pre_hook(self, ranks: list[int]) -> Any:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self.context is None:
                return None
            where, x = hidden_states_arg(args, kwargs)
            x = self._run(ranks, x)
            if where == 0:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}
        return pre_hook

    def _post_hook(self, ranks: list[int]) -> Any:
        def post_hook(module: nn.Module, args: tuple, out: Any) -> Any:
            if self.context is None:
                return None
            if isinstance(out, tuple):
                return (self._run(ranks, out[0]), *out[1:])
            return self._run(ranks, out)
        return post_hook
