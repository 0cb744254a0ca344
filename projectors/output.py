"""Output projectors: the LLM's signal-token hidden states -> a generator's conditioning.

An any-to-any model (NExT-GPT, MiniGPT-5, CoDi-2) lets its LLM emit ``k`` signal tokens per
generated item; their last-layer hidden states (N, k, in_dim) go through an output projector
into the generator's conditioning space (N, out_len, out_dim) — e.g. Stable Diffusion's
77 x 768 text-encoder states. Validation fills ``in_dim`` (the backbone's hidden size) and
``out_len``/``out_dim`` (the generator's conditioning shape) when they are left out, and
reports both numbers when a set value disagrees with the generator.

* ``output_mlp`` (CoDi-2): an MLP per signal state, then a learned linear map along the
  token axis from k to out_len rows (skipped when k == out_len).
* ``output_transformer`` (NExT-GPT's "tiny transformer"): the signal states are encoded by
  self-attention blocks, then out_len learned queries read them through cross-attention
  blocks (a small encoder-decoder), and a linear maps to out_dim.
* ``output_qformer`` (MiniGPT-5's "transformer + MLP", Q-Former style): out_len learned
  queries in a Q-Former stack that cross-attends to the signal states every
  ``cross_attention_every``-th block, then a 2-layer MLP to out_dim.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from mmhub.interfaces import BuildContext, ComponentConfig, OutputProjector, OutputProjectorConfig
from mmhub.projectors.mlp import mlp_stack
from mmhub.projectors.qformer import QFormerBlock, QueryTransformer, sinusoid


def _filled(config: OutputProjectorConfig, name: str) -> tuple[int, int, int]:
    if None in (config.in_dim, config.in_len, config.out_len, config.out_dim):
        raise ValueError(f"{name}: in_dim, in_len, out_len and out_dim must be known (validation fills them from the "
                         f"backbone, the signal-token count and the generator); got in_dim={config.in_dim}, "
                         f"in_len={config.in_len}, out_len={config.out_len}, out_dim={config.out_dim}")
    return config.in_dim, config.out_len, config.out_dim


class _Meta:
    modalities_in: ClassVar[tuple[str, ...]] = ("signal states",)
    modalities_out: ClassVar[tuple[str, ...]] = ("conditioning",)
    out_dim_doc: ClassVar[str] = "the generator's conditioning width (e.g. 768 for Stable Diffusion 1.x)"
    tokens_doc: ClassVar[str] = "the generator's conditioning length (e.g. 77 for Stable Diffusion), whatever k"


class OutputMLPConfig(OutputProjectorConfig):
    depth: int = Field(2, ge=1)
    hidden_dim: int | None = Field(None, ge=1, description="default: out_dim")
    activation: str = Field("gelu", pattern="^(gelu|relu|silu|tanh)$")


class OutputMLPProjector(_Meta, OutputProjector):
    """Per-signal-state MLP plus a learned k -> out_len token map (CoDi-2's output projector)."""

    name: ClassVar[str] = "output_mlp"
    Config: ClassVar[type[ComponentConfig]] = OutputMLPConfig
    example_settings: ClassVar[dict[str, Any]] = {"depth": 2}

    def __init__(self, config: OutputMLPConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        in_dim, out_len, out_dim = _filled(config, self.name)
        self.net = mlp_stack(in_dim, config.hidden_dim or out_dim, out_dim, config.depth, config.activation)
        self.num_signals = config.in_len or 1
        # rows of the conditioning as learned mixtures of the k signal states (identity when k == out_len)
        self.token_map = nn.Linear(self.num_signals, out_len) if self.num_signals != out_len else None

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if states.shape[1] != self.num_signals:  # the token map is sized for k
            raise ValueError(f"{self.name} was built for {self.num_signals} signal states per item, "
                             f"got {states.shape[1]}")
        h = self.net(states)  # (N, k, out_dim)
        if self.token_map is not None:
            h = self.token_map(h.transpose(1, 2)).transpose(1, 2)  # (N, out_len, out_dim)
        return h


class OutputTransformerConfig(OutputProjectorConfig):
    width: int = Field(256, ge=1)
    heads: int = Field(4, ge=1)
    encoder_layers: int = Field(2, ge=0)
    decoder_layers: int = Field(2, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)


class OutputTransformerProjector(_Meta, OutputProjector):
    """A small encoder-decoder transformer: out_len learned queries read the encoded signal states (NExT-GPT)."""

    name: ClassVar[str] = "output_transformer"
    Config: ClassVar[type[ComponentConfig]] = OutputTransformerConfig
    example_settings: ClassVar[dict[str, Any]] = {"width": 16, "heads": 2, "encoder_layers": 1, "decoder_layers": 1}

    def __init__(self, config: OutputTransformerConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        in_dim, out_len, out_dim = _filled(config, self.name)
        self.num_signals = config.in_len or 1
        self.inp = nn.Linear(in_dim, config.width)
        self.encoder = nn.ModuleList(QFormerBlock(config.width, config.heads, config.mlp_ratio, ctx.attention)
                                     for _ in range(config.encoder_layers))
        self.ln_enc = nn.LayerNorm(config.width)
        self.decoder = QueryTransformer(out_len, config.width, config.decoder_layers, config.heads, config.mlp_ratio,
                                        ctx.attention, feature_dim=config.width, cross_every=1)
        self.out = nn.Linear(config.width, out_dim)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(states.shape[1], device=states.device).expand(states.shape[0], -1)
        h = self.inp(states)
        h = h + sinusoid(pos, h.shape[-1]).to(h.dtype)
        for block in self.encoder:
            h = block(h, 0)
        return self.out(self.decoder(features=self.ln_enc(h)))  # (N, out_len, out_dim)


class OutputQFormerConfig(OutputProjectorConfig):
    width: int = Field(256, ge=1)
    heads: int = Field(4, ge=1)
    layers: int = Field(2, ge=1)
    cross_attention_every: int = Field(1, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)


class OutputQFormerProjector(_Meta, OutputProjector):
    """Q-Former-style learned queries cross-attending to the signal states, then a 2-layer MLP (MiniGPT-5)."""

    name: ClassVar[str] = "output_qformer"
    Config: ClassVar[type[ComponentConfig]] = OutputQFormerConfig
    example_settings: ClassVar[dict[str, Any]] = {"width": 16, "heads": 2, "layers": 2, "cross_attention_every": 2}

    def __init__(self, config: OutputQFormerConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        in_dim, out_len, out_dim = _filled(config, self.name)
        self.num_signals = config.in_len or 1
        self.ln_in = nn.LayerNorm(in_dim)
        self.qformer = QueryTransformer(out_len, config.width, config.layers, config.heads, config.mlp_ratio,
                                        ctx.attention,
                                        feature_dim=in_dim, cross_every=config.cross_attention_every)
        self.mlp = nn.Sequential(nn.Linear(config.width, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.qformer(features=self.ln_in(states)))  # (N, out_len, out_dim)


OUTPUT_PROJECTORS = (OutputMLPProjector, OutputTransformerProjector, OutputQFormerProjector)
