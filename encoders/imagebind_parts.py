"""ImageBind's module tree (Girdhar et al. 2023, facebookresearch/ImageBind ``imagebind_model.py``), parameter for
parameter under the official checkpoint's names, so a published state dict loads by name.

Per trunk (``vision``, ``audio``, ``depth``, ``thermal``, ``imu``):

* ``modality_preprocessors.<m>``: a patch stem (a kernel = stride Conv3d over 2-frame clips for vision, an image
  repeated to 2 frames; a Conv2d for audio, 16 x 16 every 10, and for depth/thermal, 16 x 16; a bias-free Linear over
  6 x 8 IMU windows), a LayerNorm after it (all but vision), a CLS token, learned positions over [CLS; patches];
* ``modality_trunks.<m>``: pre-LN transformer blocks, ``x + Attn(LN1 x)``, ``x + MLP(LN2 x)`` (LayerNorm eps 1e-6,
  GELU MLP of 4x width); the vision trunk has a LayerNorm before its blocks; every trunk but vision's appends a learned
  bias key and value to each sequence (``add_bias_kv``);
* ``modality_heads.<m>``: LayerNorm (eps 1e-6), the CLS token, a bias-free Linear to the joint space;
* ``modality_postprocessors.<m>``: L2 normalisation, then (not vision) a fixed logit scale: audio 20, depth 5,
  thermal 10, IMU 5 (clipped at 100).

Stochastic depth (ImageBind trains audio with drop-path 0.1, IMU 0.7) and the IMU head's dropout are inference
no-ops and are not reproduced; ImageBind's text tower is not built here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmhub.attention import attention, merge_heads, split_heads

LOGIT_SCALE = {"audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0}  # fixed (not learned) in ImageBind
MAX_LOGIT_SCALE = 100.0
IMU_CHANNELS = 6


class RepeatTo2Frames(nn.Module):
    """(N, C, H, W) image -> (N, C, 2, H, W), the image repeated; a (N, C, T, H, W) clip passes (ImageBind's
    PadIm2Video)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x[:, :, None]
        return x.repeat(1, 1, 2, 1, 1) if x.shape[2] == 1 else x


class PatchStem(nn.Module):
    """``proj`` (a conv, or a sequence ending in one) -> (N, tokens, width) -> ``norm_layer`` when there is one."""

    def __init__(self, proj: nn.Module, norm: nn.Module | None = None):
        super().__init__()
        self.proj = proj
        self.norm_layer = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        x = x.flatten(2).transpose(1, 2) if x.ndim > 3 else x
        return self.norm_layer(x) if self.norm_layer is not None else x


class PosEmbed(nn.Module):
    """Learned positions of [CLS; patches] (ImageBind's ``pos_embedding_helper``)."""

    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, width) * width ** -0.5)


class PatchPreprocessor(nn.Module):
    """Vision / audio / depth / thermal: stem -> [CLS; patches] + positions. The stem sits under ImageBind's attribute
    name: ``rgbt_stem`` (vision, audio, thermal) or ``depth_stem`` (depth)."""

    def __init__(self, stem: PatchStem, tokens: int, width: int, stem_name: str = "rgbt_stem"):
        super().__init__()
        self.stem_name = stem_name
        self.add_module(stem_name, stem)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.pos_embedding_helper = PosEmbed(tokens + 1, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = getattr(self, self.stem_name)(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embedding_helper.pos_embed


class IMUPreprocessor(nn.Module):
    """(N, 6, L) IMU -> windows of ``kernel`` steps (6 x kernel values each) -> Linear + LayerNorm -> [CLS; windows]
    + positions (ImageBind keeps these positions directly as ``pos_embed``)."""

    def __init__(self, kernel: int, length: int, width: int):
        super().__init__()
        self.kernel = kernel
        self.imu_stem = PatchStem(nn.Linear(IMU_CHANNELS * kernel, width, bias=False), nn.LayerNorm(width))
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, length // kernel + 1, width) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windows = x.unfold(-1, self.kernel, self.kernel).permute(0, 2, 1, 3).flatten(2)  # (N, L/k, 6k)
        tokens = self.imu_stem(windows)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed


class BiasKVAttention(nn.Module):
    """Multi-head self-attention with packed q/k/v projections (``in_proj_*``, ``out_proj``) and, with `bias_kv`, a
    learned key and value appended to every sequence: ``softmax(q [K; b_k]^T / sqrt(d)) [V; b_v]``."""

    def __init__(self, width: int, heads: int, bias_kv: bool, backend: str = "auto"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias_kv:
            self.bias_k = nn.Parameter(torch.randn(1, 1, width) * 0.02)
            self.bias_v = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        else:
            self.bias_k = self.bias_v = None
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if self.bias_k is not None:
            n = x.shape[0]
            k = torch.cat([k, self.bias_k.expand(n, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, -1)], dim=1)
        out = attention(*(split_heads(t, self.heads) for t in (q, k, v)), None, self.backend)
        return self.out_proj(merge_heads(out))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN block: x + Attn(LN1 x), then x + MLP(LN2 x); LayerNorm eps 1e-6."""

    def __init__(self, width: int, heads: int, bias_kv: bool, backend: str = "auto"):
        super().__init__()
        self.attn = BiasKVAttention(width, heads, bias_kv, backend)
        self.norm_1 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, 4 * width)
        self.norm_2 = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    """``pre_transformer_layer`` (vision: a LayerNorm, eps 1e-6; other trunks: nothing) then the blocks."""

    def __init__(self, width: int, blocks: int, heads: int, pre_ln: bool, bias_kv: bool, backend: str = "auto"):
        super().__init__()
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(width, eps=1e-6) if pre_ln else nn.Identity())
        self.blocks = nn.ModuleList(Block(width, heads, bias_kv, backend) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_transformer_layer(x)
        for block in self.blocks:
            x = block(x)
        return x


class SelectCLS(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def head(width: int, out: int, dropout: bool = False) -> nn.Sequential:
    """LayerNorm (eps 1e-6) -> the CLS token -> [Dropout (IMU)] -> bias-free Linear (keys ``.0``, ``.2`` / ``.3``)."""
    parts: list[nn.Module] = [nn.LayerNorm(width, eps=1e-6), SelectCLS()]
    if dropout:
        parts.append(nn.Dropout(0.5))
    return nn.Sequential(*parts, nn.Linear(width, out, bias=False))


class Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1, p=2)


class LogitScale(nn.Module):
    """x * min(exp(log_logit_scale), 100) with a fixed scale (a persistent buffer, as in the checkpoint)."""

    def __init__(self, scale: float):
        super().__init__()
        self.register_buffer("log_logit_scale", torch.tensor(math.log(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * x


def postprocessor(trunk: str) -> nn.Module:
    """vision: L2 normalisation; the others: that, then their fixed logit scale (keys ``.1.log_logit_scale``)."""
    return Normalize() if trunk == "vision" else nn.Sequential(Normalize(), LogitScale(LOGIT_SCALE[trunk]))
