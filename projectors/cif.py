"""Continuous Integrate-and-Fire (CIF, Dong & Xu 2020) and the ``cif`` projector built on it (X-LLM's C-Former).

CIF turns a sequence of encoder frames into a shorter, token-level sequence. Each frame ``u`` gets a weight
``alpha_u`` in (0, 1) (a sigmoid, here after a 1-D convolution with a residual and a ReLU, as common CIF predictors
do). Frames are integrated in order, ``state += alpha_u * h_u``, until the accumulated weight reaches the threshold
``beta`` (1.0); then the frame's weight is split: the part ``beta - accumulated`` completes the current token, which
fires (the integrated state is emitted), and the rest starts the next token (firing again while the rest still
reaches ``beta``). In training the weights are first scaled to sum to the target length
(``alpha * target / sum(alpha)``) so exactly that many tokens fire; at inference a remainder above a tail threshold
(0.5) fires one last token. The quantity loss ``|sum(alpha) - target|`` teaches the unscaled weights the length.

`integrate_and_fire` computes the same tokens in parallel: with ``S_u`` the cumulative weight after frame ``u``,
token ``k`` (``k = 1, 2, ...``) takes frame ``u`` with weight ``|[S_{u-1}, S_u] & [(k-1) beta, k beta]|``, the length
of the overlap, which is exactly the part of ``alpha_u`` the sequential loop gives it.

The ``cif`` projector (X-LLM's C-Former: CIF, then a transformer, then a linear adapter into the LLM) emits a fixed
``num_tokens`` per item, as every mmhub projector does: its weights are always scaled to ``num_tokens`` (CIF's
training-time scaling, with the target length ``num_tokens``), also at inference, where CIF would let the item's
own weights decide the count. X-LLM's target lengths are the transcripts' token counts of its ASR pre-training;
here ``quantity_loss`` (off by default) trains the unscaled weights' sum toward ``num_tokens``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from mmhub.interfaces import BuildContext, ComponentConfig, Projector, ProjectorConfig, TextContext
from mmhub.projectors.qformer import QFormerBlock

FIRE_EPS = 1e-4  # a token whose weight falls short of beta by float rounding only still fires


def scale_weights(alphas: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
    """(N, T) weights scaled to sum to `target` per item (a number or an (N,) tensor): ``alpha * target / sum``."""
    target = torch.as_tensor(target, dtype=alphas.dtype, device=alphas.device)
    return alphas * (target.reshape(-1, 1) / alphas.sum(1, keepdim=True).clamp_min(torch.finfo(alphas.dtype).tiny))


def integrate_and_fire(frames: torch.Tensor, alphas: torch.Tensor, threshold: float = 1.0,
                       tail_threshold: float | None = 0.5,
                       num_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CIF over (N, T, C) `frames` with (N, T) non-negative weights `alphas`.

    Returns ``(tokens, counts)``: (N, K, C) fired tokens, zero past each item's (N,) ``counts``. A token fires each
    time the accumulated weight reaches `threshold`; a remainder above `tail_threshold` fires a last one (None: never).
    K is `num_tokens` when given (counts beyond it are cut), else the largest count.
    """
    if frames.shape[:2] != alphas.shape:
        raise ValueError(f"CIF needs one weight per frame: frames {tuple(frames.shape)} (N, T, C) but weights "
                         f"{tuple(alphas.shape)}; fix: give weights of shape {tuple(frames.shape[:2])}")
    if threshold <= 0:
        raise ValueError(f"the CIF threshold must be positive, got {threshold}")
    after = alphas.cumsum(1)  # S_u
    before = after - alphas  # S_{u-1}
    total = after[:, -1] / threshold
    counts = torch.floor(total + FIRE_EPS).long()
    if tail_threshold is not None:
        counts = counts + ((total - counts) * threshold > tail_threshold).long()
    k_max = int(num_tokens) if num_tokens is not None else int(counts.max().item()) if counts.numel() else 0
    counts = counts.clamp(max=k_max)
    k = torch.arange(k_max, device=alphas.device, dtype=alphas.dtype)
    lo, hi = (k * threshold)[None, :, None], ((k + 1) * threshold)[None, :, None]  # token k's span of the weight
    overlap = (torch.minimum(after[:, None, :], hi) - torch.maximum(before[:, None, :], lo)).clamp_min(0)  # (N, K, T)
    fired = torch.arange(k_max, device=alphas.device)[None, :] < counts[:, None]
    weights = overlap * fired[..., None].to(overlap.dtype)
    return torch.einsum("nkt,ntc->nkc", weights, frames.to(weights.dtype)).to(frames.dtype), counts


class WeightPredictor(nn.Module):
    """(N, T, C) frames -> (N, T) CIF weights in (0, 1): conv1d (+ residual) -> ReLU -> linear -> sigmoid."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2) if kernel else None
        self.out = nn.Linear(dim, 1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        h = frames
        if self.conv is not None:
            h = h + self.conv(frames.transpose(1, 2)).transpose(1, 2)
        return torch.sigmoid(self.out(torch.relu(h))).squeeze(-1)


class CIFConfig(ProjectorConfig):
    """Settings of `CIFProjector`."""

    num_tokens: int = Field(32, ge=1, description="tokens fired per item (the weights are scaled to sum to it)")
    threshold: float = Field(1.0, gt=0, description="CIF's firing threshold beta")
    conv_kernel: int = Field(3, ge=0, description="width of the weight predictor's 1-D convolution (odd; 0: none)")
    width: int = Field(768, ge=1, description="the transformer's width after CIF")
    layers: int = Field(2, ge=0, description="transformer layers over the fired tokens")
    heads: int = Field(12, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    quantity_loss: float = Field(0.0, ge=0, description="weight of CIF's quantity loss |sum(alpha) - num_tokens| "
                                 "(added as the projector's auxiliary loss in training; 0: off)")

    @model_validator(mode="after")
    def _check(self) -> "CIFConfig":
        if self.conv_kernel and self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel {self.conv_kernel} is even, so the weights would not line up with the "
                             f"frames; fix: use an odd width ({self.conv_kernel + 1}) or 0 for no convolution")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}; fix: pick heads that divide "
                             f"the width (e.g. heads: {math.gcd(self.width, self.heads)})")
        return self


class CIFProjector(Projector):
    """X-LLM's C-Former: CIF fires ``num_tokens`` tokens from the frames, a transformer reads them, a linear maps them
    to the LLM width."""

    name: ClassVar[str] = "cif"
    Config: ClassVar[type[ComponentConfig]] = CIFConfig
    tokens_doc: ClassVar[str] = "num_tokens"
    example_settings: ClassVar[dict[str, Any]] = {"num_tokens": 4, "width": 16, "heads": 2, "layers": 1}

    @classmethod
    def num_tokens(cls, config: CIFConfig, in_tokens: int) -> int:  # type: ignore[override]
        return config.num_tokens

    def __init__(self, config: CIFConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self.predictor = WeightPredictor(config.in_dim, config.conv_kernel)
        self.into_width = nn.Linear(config.in_dim, config.width) if config.in_dim != config.width else nn.Identity()
        self.blocks = nn.ModuleList(QFormerBlock(config.width, config.heads, config.mlp_ratio, ctx.attention)
                                    for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.proj = nn.Linear(config.width, config.out_dim)

    def weights(self, features: torch.Tensor) -> torch.Tensor:
        """(N, T, in_dim) frames -> (N, T) CIF weights, unscaled."""
        return self.predictor(features)

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        cfg: CIFConfig = self.config  # type: ignore[assignment]
        alphas = self.weights(features)
        self.aux_loss = cfg.quantity_loss * (alphas.sum(1) - cfg.num_tokens).abs().mean() \
            if self.training and cfg.quantity_loss > 0 else None
        tokens, _ = integrate_and_fire(features, scale_weights(alphas, float(cfg.num_tokens)), cfg.threshold,
                                       tail_threshold=None, num_tokens=cfg.num_tokens)
        h = self.into_width(tokens)
        for block in self.blocks:
            h = block(h, h.shape[1])
        return self.proj(self.norm(h))
