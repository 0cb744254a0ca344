"""Point-BERT (Yu et al. 2022), the point-cloud transformer ULIP-2 trains and X-InstructBLIP reads 3D through, under
ULIP's parameter names (less ``module.point_encoder.``), so a converted ULIP checkpoint loads by name.

Per cloud of ``num_points`` points (xyz, then any extra channels, e.g. RGB: ``in_channels``):

* grouping: ``num_group`` centres by farthest-point sampling from the first point (as pointnet2's
  ``furthest_point_sample``), each with its ``group_size`` nearest points (kNN), xyz relative to the centre, the
  extra channels as they are;
* ``encoder``: a mini-PointNet per group: ``first_conv`` (1x1 Conv 128, BatchNorm, ReLU, 1x1 Conv 256), the max over
  the group concatenated before every point's feature, ``second_conv`` (1x1 Conv 512, BatchNorm, ReLU, 1x1 Conv
  ``encoder_dims``), the max over the group -> one token; ``reduce_dim`` (Linear to ``trans_dim``);
* [``cls_token``; tokens], positions [``cls_pos``; ``pos_embed``(centre)] (Linear 3->128, GELU, Linear), added before
  every one of the ``depth`` pre-LN blocks (``blocks.blocks.<i>``: qkv without bias, exact GELU MLP of 4x width),
  then ``norm``.

``output: tokens`` gives the ``1 + num_group`` tokens after ``norm`` (``trans_dim`` wide); ``output: pooled`` gives
ULIP's point feature, [CLS; the max over the group tokens] (``2 * trans_dim`` wide, one token). Stochastic depth
(training only) is not reproduced.

Items (``preprocess``): what `mmhub.encoders.point_encoder.read_points` reads; centred and scaled into the unit
sphere (``normalize``), then brought to exactly ``num_points`` points deterministically (farthest-point order from the
point farthest from the centroid; a smaller cloud repeated cyclically).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from mmhub.attention import attention, merge_heads, split_heads
from mmhub.encoders.point_encoder import farthest_point_order, read_points
from mmhub.errors import InputError
from mmhub.interfaces import BuildContext, ComponentConfig, Encoder, EncoderFacts
from mmhub.weights import load_into, read_state_dict


class PointBertConfig(ComponentConfig):
    """Settings of `PointBertEncoder`; the defaults are ULIP-2's Point-BERT (PointTransformer_8192point)."""

    num_points: int = Field(8192, ge=1)
    num_group: int = Field(512, ge=1)
    group_size: int = Field(32, ge=1)
    in_channels: int = Field(3, ge=3, description="3 for xyz, 6 for xyz + rgb (ULIP-2's colored clouds)")
    encoder_dims: int = Field(256, ge=1)
    trans_dim: int = Field(384, ge=1)
    depth: int = Field(12, ge=0)
    num_heads: int = Field(6, ge=1)
    output: Literal["tokens", "pooled"] = "tokens"
    normalize: bool = True
    pretrained: str | None = None

    @model_validator(mode="after")
    def _sizes(self) -> "PointBertConfig":
        if max(self.num_group, self.group_size) > self.num_points:
            raise ValueError(f"num_group {self.num_group} and group_size {self.group_size} must not exceed "
                             f"num_points {self.num_points}")
        if self.trans_dim % self.num_heads:
            raise ValueError(f"trans_dim {self.trans_dim} is not divisible by num_heads {self.num_heads}")
        return self


def fps_from_first(xyz: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N, 3) -> (B, k) indices: farthest-point sampling that starts at point 0 (pointnet2's order)."""
    b, n, _ = xyz.shape
    idx = torch.zeros(b, k, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, n), float("inf"), dtype=xyz.dtype, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    last = torch.zeros(b, dtype=torch.long, device=xyz.device)
    for i in range(1, k):
        dist = torch.minimum(dist, (xyz - xyz[rows, last][:, None]).pow(2).sum(-1))
        last = dist.argmax(-1)
        idx[:, i] = last
    return idx


def _conv_stage(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    """1x1 Conv, BatchNorm, ReLU, 1x1 Conv (keys ``.0``, ``.1``, ``.3``)."""
    return nn.Sequential(nn.Conv1d(c_in, hidden, 1), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Conv1d(hidden, c_out, 1))


class MiniPointNet(nn.Module):
    """(B, G, K, C) groups -> (B, G, encoder_dims): Point-BERT's ``Encoder``."""

    def __init__(self, in_channels: int, out: int):
        super().__init__()
        self.first_conv = _conv_stage(in_channels, 128, 256)
        self.second_conv = _conv_stage(512, 512, out)

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        b, g, k, c = groups.shape
        f = self.first_conv(groups.reshape(b * g, k, c).transpose(1, 2))  # (BG, 256, K)
        f = torch.cat([f.max(2, keepdim=True).values.expand_as(f), f], dim=1)  # (BG, 512, K)
        return self.second_conv(f).max(2).values.reshape(b, g, -1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, backend: str):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(merge_heads(attention(q, k, v, None, self.backend)))


class Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, backend: str):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, backend)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    """The blocks, the positions added before each (``blocks.blocks.<i>``)."""

    def __init__(self, dim: int, depth: int, heads: int, backend: str):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, backend) for _ in range(depth))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


class PointBertEncoder(Encoder):
    """Point-BERT as ULIP-2 trains it: FPS + kNN groups, a mini-PointNet per group, a CLS token, a transformer."""

    name: ClassVar[str] = "point_bert"
    Config: ClassVar[type[ComponentConfig]] = PointBertConfig
    modalities_in: ClassVar[tuple[str, ...]] = ("points",)
    # `pretrained` reads ULIP's Point-BERT tensors by name (mmhub.importers.convert_ulip_pointbert writes them from a
    # ULIP checkpoint); the layout and the arithmetic are tested against Point-BERT's equations
    published_weights: ClassVar[bool] = True
    out_dim_doc: ClassVar[str] = "tokens: trans_dim; pooled: 2 * trans_dim ([CLS; max over groups], ULIP's feature)"
    tokens_doc: ClassVar[str] = "tokens: 1 + num_group (CLS and one per FPS-chosen group); pooled: 1"
    example_settings: ClassVar[dict[str, Any]] = {"num_points": 128, "num_group": 8, "group_size": 8,
                                                  "encoder_dims": 32, "trans_dim": 32, "depth": 2, "num_heads": 2}

    @classmethod
    def describe(cls, config: PointBertConfig, ctx: BuildContext) -> EncoderFacts:
        if config.pretrained is not None:
            ctx.weights(config.pretrained)
        if config.output == "pooled":
            return EncoderFacts(out_dim=2 * config.trans_dim, tokens_per_item=1)
        return EncoderFacts(out_dim=config.trans_dim, tokens_per_item=1 + config.num_group)

    def __init__(self, config: PointBertConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        d = config.trans_dim
        self.encoder = MiniPointNet(config.in_channels, config.encoder_dims)
        self.reduce_dim = nn.Linear(config.encoder_dims, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, d))
        self.blocks = TransformerEncoder(d, config.depth, config.num_heads, ctx.attention)
        self.norm = nn.LayerNorm(d)
        if config.pretrained is not None:
            load_into(self, read_state_dict(ctx.weights(config.pretrained)),
                      what=f"point_bert weights {config.pretrained}")

    @property
    def out_dim(self) -> int:
        return self.config.trans_dim * (2 if self.config.output == "pooled" else 1)

    def has_weight_source(self) -> bool:
        return self.config.pretrained is not None

    def preprocess(self, item: Any, modality: str) -> torch.Tensor:
        cfg = self.config
        points = read_points(item)
        if points.shape[1] != cfg.in_channels:
            raise InputError(f"the point cloud has {points.shape[1]} values per point but point_bert takes "
                             f"in_channels = {cfg.in_channels}; pass (N, {cfg.in_channels}) points or set "
                             f"in_channels: {points.shape[1]}")
        if cfg.normalize:
            xyz = points[:, :3] - points[:, :3].mean(0)
            scale = np.sqrt((xyz ** 2).sum(1).max())
            points[:, :3] = xyz / scale if scale > 0 else xyz
        n = points.shape[0]
        order = farthest_point_order(points[:, :3], min(n, cfg.num_points))
        if n < cfg.num_points:
            order = order[np.arange(cfg.num_points) % n]
        return torch.from_numpy(points[order])  # (num_points, in_channels)

    def forward(self, points: torch.Tensor, modality: str) -> torch.Tensor:
        cfg = self.config
        if points.ndim != 3 or points.shape[-1] != cfg.in_channels or points.shape[1] < cfg.num_group:
            raise InputError(f"points batch must be (N, num_points, {cfg.in_channels}) with at least num_group = "
                             f"{cfg.num_group} points, got {tuple(points.shape)}; use this encoder's preprocess")
        points = points.to(self.cls_token.dtype)
        xyz = points[..., :3]
        rows = torch.arange(points.shape[0], device=points.device)[:, None]
        centres = xyz[rows, fps_from_first(xyz.float(), cfg.num_group)]  # (B, G, 3)
        knn = torch.cdist(centres.float(), xyz.float()).topk(cfg.group_size, dim=-1, largest=False).indices
        groups = points[rows[:, :, None], knn]  # (B, G, K, C)
        groups = torch.cat([groups[..., :3] - centres[:, :, None], groups[..., 3:]], dim=-1)
        tokens = self.reduce_dim(self.encoder(groups))
        n = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(n, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(n, -1, -1), self.pos_embed(centres)], dim=1)
        x = self.norm(self.blocks(x, pos))  # (B, 1 + G, trans_dim)
        if cfg.output == "pooled":
            return torch.cat([x[:, 0], x[:, 1:].max(1).values], dim=-1)[:, None]  # (B, 1, 2 * trans_dim)
        return x
