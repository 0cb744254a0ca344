"""Point-cloud encoder: a small Point-BERT-style transformer over PointNet-embedded local groups.

X-InstructBLIP reads 3D through ULIP-2's Point-BERT encoder; this is that kind of
encoder, built from its settings (random weights; ``pretrained`` loads a local
state dict, and a plugin can register a converted real one under another name).

Per cloud: ``num_groups`` centres are chosen by farthest-point sampling (FPS), each
with its ``group_size`` nearest neighbours (kNN) as coordinates relative to the centre
(plus any extra per-point channels, e.g. RGB); a mini-PointNet (shared MLP, max-pool,
the pooled feature concatenated back to every point, a second shared MLP, max-pool)
turns each group into one token; a learned embedding of the centre's coordinates is
the position; ``depth`` pre-norm transformer blocks (attention through
`mmhub.attention`, backend = the spec's ``attention``) give ``num_groups`` tokens of
width ``width``.

Items: an (N, 3) or (N, 3 + C) array (C = ``in_channels - 3`` extra channels), or a
path to a ``.npy`` file or a ``.xyz`` / ``.txt`` / ASCII ``.ply`` text file. Every cloud
is centred on its centroid and scaled into the unit sphere (largest distance 1) when
``normalize`` is on (the default), then brought to exactly ``num_points`` points
deterministically: FPS picks ``num_points`` points from a larger cloud; a smaller
cloud is listed in FPS order and repeated cyclically. FPS always starts at the
point farthest from the centroid, so the same cloud gives the same tokens, and so
does any permutation of its points (up to exact distance ties).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from mmhub.attention import MultiheadAttention
from mmhub.errors import InputError
from mmhub.interfaces import BuildContext, ComponentConfig, Encoder, EncoderFacts
from mmhub.weights import load_into, read_state_dict

MAX_POINTS = 50_000_000  # points read from one file at most


class PointEncoderConfig(ComponentConfig):
    """Settings of `PointEncoder`."""

    num_points: int = Field(1024, ge=1)
    num_groups: int = Field(64, ge=1)
    group_size: int = Field(32, ge=1)
    in_channels: int = Field(3, ge=3, description="3 for xyz, 3 + C for xyz plus C per-point channels (6 for xyz+rgb)")
    pointnet_dims: tuple[int, int] = (128, 256)
    width: int = Field(384, ge=1)
    depth: int = Field(4, ge=0)
    heads: int = Field(6, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    normalize: bool = True
    pretrained: str | None = None

    @model_validator(mode="after")
    def _sizes(self) -> "PointEncoderConfig":
        if self.num_groups > self.num_points:
            raise ValueError(f"num_groups {self.num_groups} is more than num_points {self.num_points}; "
                             f"set num_groups <= num_points")
        if self.group_size > self.num_points:
            raise ValueError(f"group_size {self.group_size} is more than num_points {self.num_points}; "
                             f"set group_size <= num_points")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        return self


def farthest_point_sample(xyz: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N, 3) -> (B, k) indices by farthest-point sampling, starting at the point farthest from the centroid."""
    b, n, _ = xyz.shape
    centroid = xyz.mean(1, keepdim=True)
    idx = torch.empty(b, k, dtype=torch.long, device=xyz.device)
    far = (xyz - centroid).pow(2).sum(-1).argmax(-1)  # (B,)
    dist = torch.full((b, n), float("inf"), dtype=xyz.dtype, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    sq = xyz.pow(2).sum(-1, keepdim=True)  # (B, N, 1)
    for i in range(k):
        idx[:, i] = far
        # |x - p|^2 = |x|^2 - 2 x.p + |p|^2: one fused matmul per step instead of a (B, N, 3) difference
        p = xyz[rows, far]  # (B, 3)
        d = torch.baddbmm(sq, xyz, p[:, :, None], alpha=-2).squeeze(-1) + p.pow(2).sum(-1, keepdim=True)
        torch.minimum(dist, d, out=dist)
        far = dist.argmax(-1)
    return idx


def farthest_point_order(xyz: np.ndarray, k: int) -> np.ndarray:
    """(N, 3) -> (k,) indices by farthest-point sampling from the point farthest from the centroid (NumPy, float64:
    preprocessing runs per item on the CPU, where this beats batched torch ops on large clouds)."""
    x = xyz.astype(np.float64)
    far = int(((x - x.mean(0)) ** 2).sum(1).argmax())
    dist = np.full(len(x), np.inf)
    idx = np.empty(k, dtype=np.int64)
    for i in range(k):
        idx[i] = far
        np.minimum(dist, ((x - x[far]) ** 2).sum(1), out=dist)
        far = int(dist.argmax())
    return idx


def read_points(item: Any) -> np.ndarray:
    """An (N, D) float32 array from an array/tensor or a .npy / .xyz / .txt / ASCII .ply file."""
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise InputError(f"point-cloud file {path} does not exist")
        suffix = path.suffix.lower()
        try:
            if suffix == ".npy":
                item = np.load(path, allow_pickle=False, mmap_mode="r")
            elif suffix in (".xyz", ".txt", ".pts"):
                with open(path, "rb") as fh:
                    comma = b"," in fh.readline()  # ModelNet-style "x,y,z,nx,ny,nz" lines
                item = np.loadtxt(path, dtype=np.float32, ndmin=2, max_rows=MAX_POINTS,
                                  delimiter="," if comma else None)
            elif suffix == ".ply":
                item = _read_ply_ascii(path)
            else:
                raise InputError(f"point-cloud file {path} has an unknown type {suffix!r}; use .npy, .xyz/.txt "
                                 f"(one point per line) or an ASCII .ply")
        except (ValueError, OSError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"point-cloud file {path} could not be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(item, np.ndarray):
        raise InputError(f"cannot read points from a {type(item).__name__}; pass an (N, 3) or (N, 3 + C) array or a "
                         f".npy / .xyz / ASCII .ply path")
    if item.ndim != 2 or item.shape[1] < 3 or item.shape[0] < 1:
        raise InputError(f"a point cloud must be an (N, 3) xyz array (or (N, 3 + C) with C extra channels) with "
                         f"N >= 1, got shape {item.shape}; reshape it so each row is one point's x, y, z[, channels]")
    if not np.issubdtype(item.dtype, np.number):
        raise InputError(f"point-cloud values must be numbers, got dtype {item.dtype}")
    points = np.array(item, dtype=np.float32)  # a copy: a memory-mapped .npy stays untouched
    if not np.isfinite(points).all():
        raise InputError("the point cloud holds NaN or infinite values; drop those points first")
    return points


def _read_ply_ascii(path: Path) -> np.ndarray:
    with open(path, "rb") as fh:
        if fh.readline().strip() != b"ply":
            raise InputError(f"{path} is not a PLY file (no 'ply' magic line)")
        count, props, in_vertex, fmt = 0, [], False, b""
        for raw in fh:
            line = raw.strip()
            if line.startswith(b"format"):
                fmt = line.split()[1]
            elif line.startswith(b"element"):
                parts = line.split()
                in_vertex = parts[1] == b"vertex"
                if in_vertex:
                    count = int(parts[2])
            elif line.startswith(b"property") and in_vertex:
                props.append(line.split()[-1].decode())
            elif line == b"end_header":
                break
        if fmt != b"ascii":
            raise InputError(f"{path} is a {fmt.decode() or 'unknown'}-format PLY; only ASCII PLY is read here "
                             f"(convert it, or load it yourself and pass the (N, 3) array)")
        if not {"x", "y", "z"} <= set(props):
            raise InputError(f"{path}: the PLY vertices have no x, y, z properties ({props})")
        data = np.loadtxt(fh, dtype=np.float32, ndmin=2, max_rows=min(count, MAX_POINTS))
    cols = [props.index(c) for c in ("x", "y", "z")] + [i for i, p in enumerate(props) if p not in ("x", "y", "z")]
    return data[:, : len(props)][:, cols]


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)); attention through `mmhub.attention`."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, backend: str = "auto"):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = MultiheadAttention(width, heads, backend=backend)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class MiniPointNet(nn.Module):
    """(B, G, K, C) grouped points -> (B, G, out) group tokens (Point-BERT's two-stage shared MLP with max-pools)."""

    def __init__(self, in_channels: int, dims: tuple[int, int], out: int):
        super().__init__()
        d1, d2 = dims
        self.first = nn.Sequential(nn.Linear(in_channels, d1), nn.LayerNorm(d1), nn.GELU(), nn.Linear(d1, d2))
        self.second = nn.Sequential(nn.Linear(2 * d2, 2 * d2), nn.LayerNorm(2 * d2), nn.GELU(), nn.Linear(2 * d2, out))

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        f = self.first(groups)  # (B, G, K, d2)
        pooled = f.max(2, keepdim=True).values
        f = self.second(torch.cat([pooled.expand_as(f), f], dim=-1))  # (B, G, K, out)
        return f.max(2).values


class PointEncoder(Encoder):
    """Point-BERT-style 3D encoder: FPS + kNN groups, mini-PointNet tokens, a small transformer (ULIP-2's slot)."""

    name: ClassVar[str] = "pointnet"
    Config: ClassVar[type[ComponentConfig]] = PointEncoderConfig
    modalities_in: ClassVar[tuple[str, ...]] = ("points",)
    out_dim_doc: ClassVar[str] = "width"
    tokens_doc: ClassVar[str] = "num_groups (one token per FPS-chosen local group)"
    example_settings: ClassVar[dict[str, Any]] = {"num_points": 256, "num_groups": 16, "group_size": 8,
                                                  "pointnet_dims": [16, 32], "width": 32, "depth": 2, "heads": 2}

    @classmethod
    def describe(cls, config: PointEncoderConfig, ctx: BuildContext) -> EncoderFacts:
        if config.pretrained is not None:
            ctx.weights(config.pretrained)
        return EncoderFacts(out_dim=config.width, tokens_per_item=config.num_groups)

    def __init__(self, config: PointEncoderConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        w = config.width
        self.group_embed = MiniPointNet(config.in_channels, config.pointnet_dims, w)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, w))
        self.blocks = nn.ModuleList(TransformerBlock(w, config.heads, config.mlp_ratio, ctx.attention)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(w)
        if config.pretrained is not None:
            load_into(self, read_state_dict(ctx.weights(config.pretrained)),
                      what=f"pointnet weights {config.pretrained}")

    @property
    def out_dim(self) -> int:
        return self.config.width

    def has_weight_source(self) -> bool:
        return self.config.pretrained is not None

    def preprocess(self, item: Any, modality: str) -> torch.Tensor:
        points = read_points(item)
        want = self.config.in_channels
        if points.shape[1] != want:
            what = f"xyz + {want - 3} channels" if want > 3 else "xyz"
            raise InputError(f"the point cloud has {points.shape[1]} values per point but this encoder takes "
                             f"in_channels = {want} ({what}); pass (N, {want}) points or set in_channels: "
                             f"{points.shape[1]}")
        if self.config.normalize:
            xyz = points[:, :3] - points[:, :3].mean(0)
            scale = np.sqrt((xyz ** 2).sum(1).max())
            points[:, :3] = xyz / scale if scale > 0 else xyz
        n, want = points.shape[0], self.config.num_points
        order = farthest_point_order(points[:, :3], min(n, want))
        if n < want:  # every point in FPS order, repeated cyclically
            order = order[np.arange(want) % n]
        return torch.from_numpy(points[order])  # (num_points, in_channels)

    def forward(self, points: torch.Tensor, modality: str) -> torch.Tensor:
        cfg = self.config
        if points.ndim != 3 or points.shape[-1] != cfg.in_channels:
            raise InputError(f"points batch must be (N, num_points, {cfg.in_channels}), got {tuple(points.shape)}; "
                             f"use this encoder's preprocess")
        dtype = next(self.parameters()).dtype
        points = points.to(dtype)
        xyz = points[..., :3]
        b = points.shape[0]
        rows = torch.arange(b, device=points.device)[:, None]
        centres_idx = farthest_point_sample(xyz.float(), cfg.num_groups)  # (B, G)
        centres = xyz[rows, centres_idx]  # (B, G, 3)
        d = torch.cdist(centres.float(), xyz.float())  # (B, G, N)
        knn = d.topk(cfg.group_size, dim=-1, largest=False).indices  # (B, G, K), nearest first
        groups = points[rows[:, :, None], knn]  # (B, G, K, C)
        groups = torch.cat([groups[..., :3] - centres[:, :, None], groups[..., 3:]], dim=-1)
        x = self.group_embed(groups)  # (B, G, width)
        pos = self.pos_embed(centres)
        for block in self.blocks:
            x = block(x + pos)
        return self.norm(x)  # (B, num_groups, width)
