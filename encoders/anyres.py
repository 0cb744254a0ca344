"""AnyRes: any registered image tower at high resolution, as LLaVA-NeXT and LLaVA-OneVision read images.

``{type: anyres, tower: {type: hf_vision | timm | open_clip | ..., ...}, grid_pinpoints: [[h, w], ...],
tile_size: S}``. An image of H x W pixels is

1. fitted into the best of ``grid_pinpoints`` (`best_resolution`: the most of the image's own pixels kept, then the
   least padding), resized with its aspect kept (`fitted_size`) and padded with black to exactly that size;
2. cut into ``rows x cols`` tiles of S x S (row-major), preceded by the whole image resized to S x S (the base);
3. every tile goes through the tower (each gives ``side x side`` tokens);
4. after the projector (`arrange`, which needs a per-token projector such as mlp or linear): the tiles' tokens are
   put back into one (rows*side) x (cols*side) grid, the rows or columns that only hold the padding are cut off
   (`unpadded`), with ``max_tiles: N`` (OneVision's ``anyres_max_N``) a grid holding more than 1.1 x N tiles'
   tokens is downscaled bilinearly to about N tiles' worth (`downscaled`), with ``newline: true`` the projector's
   ``image_newline`` embedding ends every row, and the base image's tokens come first.

This is transformers' LLaVA-NeXT/OneVision pipeline step for step (their torchvision image processor: uint8
antialiased resizes, zero padding, normalisation with ``mean``/``std`` scaled by 1 / ``rescale_factor``), so the
features match theirs exactly. The tiles are normalised here with the block's own ``mean``/``std`` (the tower's
transform is not used: AnyRes decides the geometry).

Why the row-end embedding belongs to the projector (``projectors.image.newline: true``): it lives in the LLM's
embedding space (LLaVA-NeXT adds it after projection and it never passes through the projector), so its width is the
projector's output width; a different tower keeps it valid, a different LLM replaces it together with the projector,
and it trains whenever the projector does (a frozen, feature-cached tower cannot hold a learned vector).

With ``video_frames: F`` the same encoder also reads ``video`` items as LLaVA-OneVision does (share it:
``encoders: {image: {type: anyres, ...}, video: image}``): F frames sampled uniformly (a clip of exactly F frames
is taken as is), each resized to S x S and through the tower, and after the projector each frame's token grid is
downscaled by ``video_pool`` (bilinear, sides rounded up), the frames' tokens follow each other and one
``image_newline`` ends the video: F * ceil(side / pool)^2 + 1 tokens.

The token count depends on the image: `describe` states the most any image can take in the sequence (what the token
budget counts) and how many `forward` pads every item to (with ``max_tiles`` the tiles' raw count can be more), and
`token_mask` marks each item's real tokens, which is what the prompt receives. A preprocessed item is one float32
vector: the image's height and width, its tile count (base included), then the base and its tiles; images with the
same grid stack into one batch tensor, others come as a list (`MMProcessor.collate` keeps differing shapes apart),
and `forward` takes either.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from mmhub.errors import InputError
from mmhub.interfaces import BuildContext, ComponentConfig, Encoder, EncoderFacts
from mmhub.media import load_image

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HEADER = 3  # height, width, tiles (base included)
DOWNSCALE_SLACK = 1.1  # OneVision downscales only grids holding more than 1.1 x max_tiles tiles' tokens

Size = tuple[int, int]  # (height, width)


class AnyResConfig(ComponentConfig):
    """Settings of `AnyResEncoder`."""

    tower: dict[str, Any] = Field(description="the image encoder each tile goes through: {type: NAME, ...settings}")
    grid_pinpoints: list[tuple[int, int]] = Field(min_length=1, description="the resolutions (height, width) an "
                                                  "image may be fitted into, each a multiple of tile_size")
    tile_size: int = Field(ge=1, description="the side of a tile in pixels: the tower's input size")
    newline: bool = Field(True, description="end every row of the tile grid with the projector's image_newline")
    max_tiles: int | None = Field(None, ge=1, description="OneVision's anyres_max_N: downscale grids over N tiles")
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = Field(1 / 255, gt=0)
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    video_frames: int | None = Field(None, ge=1, description="frames per video item (OneVision's video path); "
                                     "None: no video")
    video_pool: int = Field(2, ge=1, description="video: each frame's token grid downscaled by this factor")

    @model_validator(mode="after")
    def _whole_tiles(self) -> "AnyResConfig":
        bad = [p for p in self.grid_pinpoints if p[0] % self.tile_size or p[1] % self.tile_size or min(p) < 1]
        if bad:
            raise ValueError(f"grid_pinpoints {bad} are not whole multiples of tile_size {self.tile_size}; give "
                             f"resolutions of k x {self.tile_size} pixels")
        return self


# -- geometry (transformers' select_best_resolution, get_patch_output_size, unpad_image, OneVision's downscale) -----
def best_resolution(size: Size, pinpoints: list[tuple[int, int]]) -> Size:
    """The pinpoint (height, width) keeping most of the image's pixels once fitted, ties to the least padding."""
    height, width = size
    best, kept_best, waste_best = pinpoints[0], -1, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = ph * pw - kept
        if kept > kept_best or (kept == kept_best and waste < waste_best):
            best, kept_best, waste_best = (ph, pw), kept, waste
    return best


def fitted_size(size: Size, target: Size) -> Size:
    """The (height, width) an image of `size` is resized to inside `target`, its aspect kept."""
    (height, width), (th, tw) = size, target
    if tw / width < th / height:
        return min(math.ceil(height * tw / width), th), tw
    return th, min(math.ceil(width * th / height), tw)


def grid_of(size: Size, pinpoints: list[tuple[int, int]], tile: int) -> Size:
    """(rows, cols) of tiles for an image of `size`."""
    ph, pw = best_resolution(size, pinpoints)
    return ph // tile, pw // tile


def unpadded(rows: int, cols: int, size: Size) -> tuple[slice, slice]:
    """The rows and columns of a rows x cols token grid that hold the image of `size` (not its padding)."""
    height, width = size
    if width / height > cols / rows:
        kept = int(round(height * (cols / width), 7))
        pad = (rows - kept) // 2
        return slice(pad, rows - pad), slice(0, cols)
    kept = int(round(width * (rows / height), 7))
    pad = (cols - kept) // 2
    return slice(0, rows), slice(pad, cols - pad)


def downscaled(rows: int, cols: int, side: int, max_tiles: int | None) -> Size:
    """The grid OneVision's anyres_max_N bilinear downscale leaves (unchanged without one or when small enough)."""
    if max_tiles is None:
        return rows, cols
    ratio = math.sqrt(rows * cols / (max_tiles * side * side))
    if ratio > DOWNSCALE_SLACK:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


def _span(s: slice, n: int) -> int:
    return len(range(n)[s])


def item_tokens(size: Size, config: AnyResConfig, side: int) -> int:
    """Tokens an image of `size` takes: the base tile's, then the unpadded (downscaled) grid with its row ends."""
    rows, cols = grid_of(size, config.grid_pinpoints, config.tile_size)
    r, c = rows * side, cols * side
    keep_r, keep_c = unpadded(r, c, size)
    r, c = downscaled(_span(keep_r, r), _span(keep_c, c), side, config.max_tiles)
    return side * side + r * (c + int(config.newline))


def most_tokens(config: AnyResConfig, side: int) -> int:
    """The most tokens any image can take after `arrange` (every grid, every unpadded shape of it)."""
    most = 0
    for ph, pw in config.grid_pinpoints:
        rows, cols = ph // config.tile_size * side, pw // config.tile_size * side
        shapes = [(rows, c) for c in range(1, cols + 1)] + [(r, cols) for r in range(1, rows)]
        for r, c in shapes:
            r2, c2 = downscaled(r, c, side, config.max_tiles)
            most = max(most, r2 * (c2 + int(config.newline)))
    return side * side + most


def max_grid_tiles(config: AnyResConfig) -> int:
    return max((ph // config.tile_size) * (pw // config.tile_size) for ph, pw in config.grid_pinpoints)


class AnyResEncoder(Encoder):
    """Any image tower over AnyRes tiles (LLaVA-NeXT / OneVision): a base image plus a grid fitted to the image."""

    name: ClassVar[str] = "anyres"
    Config: ClassVar[type[ComponentConfig]] = AnyResConfig
    modalities_in: ClassVar[tuple[str, ...]] = ("image", "video")
    out_dim_doc: ClassVar[str] = "the tower's width"
    tokens_doc: ClassVar[str] = ("side^2 base tokens + the unpadded tile grid (rows x (cols + 1) with newline); "
                                 "describe states the most over every pinpoint; video: frames * side^2 + 1 before "
                                 "pooling")
    variable_tokens: ClassVar[bool] = True
    example_settings: ClassVar[dict[str, Any]] = {
        "tower": {"type": "hf_vision", "config": {
            "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": 32, "patch_size": 8}},
        "grid_pinpoints": [[32, 64], [64, 32], [64, 64]], "tile_size": 32, "newline": False, "video_frames": 2}

    @classmethod
    def tower_encoder(cls, config: AnyResConfig, ctx: BuildContext) -> tuple[type[Encoder], ComponentConfig]:
        """The nested image encoder's class and validated settings."""
        try:
            tower_cls, tower_config = ctx.component("encoder", config.tower)
        except Exception as exc:
            raise ValueError(f"tower: {exc}") from exc
        if "image" not in tower_cls.modalities_in or tower_cls.variable_tokens:
            raise ValueError(f"tower: the {tower_cls.name!r} encoder is not a fixed-size image encoder; give one such "
                             f"as hf_vision, open_clip or timm")
        return tower_cls, tower_config

    @classmethod
    def _tile_facts(cls, config: AnyResConfig, ctx: BuildContext) -> tuple[EncoderFacts, int]:
        tower_cls, tower_config = cls.tower_encoder(config, ctx)
        facts = tower_cls.describe(tower_config, ctx)
        per_tile = facts.tokens_for("image")
        side = math.isqrt(per_tile)
        if side * side != per_tile:
            raise ValueError(f"tower: {per_tile} tokens per tile are not a square grid; AnyRes puts the tiles' tokens "
                             f"back into one grid (drop the CLS token: e.g. hf_vision drop_cls: true)")
        return facts, side

    @classmethod
    def describe(cls, config: AnyResConfig, ctx: BuildContext) -> EncoderFacts:
        facts, side = cls._tile_facts(config, ctx)
        raw = (1 + max_grid_tiles(config)) * side * side
        most = most_tokens(config, side)
        video, spliced = {}, {"image": most}
        if config.video_frames:
            video["video"] = config.video_frames * side * side + 1
            spliced["video"] = config.video_frames * math.ceil(side / config.video_pool) ** 2 + int(config.newline)
        return EncoderFacts(out_dim=facts.out_dim, tokens_per_item=max(most, raw), tokens_by_modality=video,
                            spliced_by_modality=spliced)

    def __init__(self, config: AnyResConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        tower_cls, tower_config = self.tower_encoder(config, ctx)
        self.tower = tower_cls(tower_config, ctx)
        facts, self.side = self._tile_facts(config, ctx)
        described = self.describe(config, ctx)
        self.width, self.video_width = described.tokens_per_item, described.tokens_for("video")
        self.max_tiles_in_item = 1 + max_grid_tiles(config)
        self._mean = torch.tensor(config.mean) * (1.0 / config.rescale_factor)
        self._std = torch.tensor(config.std) * (1.0 / config.rescale_factor)

    @property
    def out_dim(self) -> int:
        return self.tower.out_dim

    def has_weight_source(self) -> bool:
        return self.tower.has_weight_source()

    # -- preprocessing ------------------------------------------------------------------------------------------
    def _resize(self, pixels: torch.Tensor, size: Size) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as tvF

        mode = getattr(tvF.InterpolationMode, self.config.interpolation.upper())
        return tvF.resize(pixels, list(size), interpolation=mode, antialias=True)

    def tiles(self, item: Any) -> tuple[torch.Tensor, Size]:
        """One image -> ((1 + rows*cols, 3, S, S) normalised base + tiles, its (height, width))."""
        from torchvision.transforms.v2 import functional as tvF

        image = load_image(item)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
        size = (int(pixels.shape[1]), int(pixels.shape[2]))
        s = self.config.tile_size
        target = best_resolution(size, self.config.grid_pinpoints)
        fitted = fitted_size(size, target)
        canvas = self._resize(pixels, fitted)
        left, extra_x = divmod(target[1] - fitted[1], 2)
        top, extra_y = divmod(target[0] - fitted[0], 2)
        canvas = tvF.pad(canvas, [left, top, left + extra_x, top + extra_y])
        parts = [self._resize(pixels, (s, s))]
        parts += [canvas[:, i:i + s, j:j + s] for i in range(0, target[0], s) for j in range(0, target[1], s)]
        stacked = torch.stack(parts).to(torch.float32)
        return tvF.normalize(stacked, self._mean.tolist(), self._std.tolist()), size

    def _video_frames(self) -> int:
        if self.config.video_frames is None:
            raise InputError("this anyres encoder reads no video (video_frames is not set); set video_frames: N for "
                             "LLaVA-OneVision's video path")
        return self.config.video_frames

    def frames(self, item: Any) -> torch.Tensor:
        """One video (frames list, (F, H, W, 3) array, animation) -> (video_frames, 3, S, S) normalised frames."""
        from torchvision.transforms.v2 import functional as tvF

        from mmhub.encoders.video_encoder import load_frames

        s = self.config.tile_size
        out = []
        for frame in load_frames(item, self._video_frames()):
            pixels = torch.from_numpy(np.asarray(load_image(frame)).copy()).permute(2, 0, 1).contiguous()
            out.append(self._resize(pixels, (s, s)))
        return tvF.normalize(torch.stack(out).to(torch.float32), self._mean.tolist(), self._std.tolist())

    def preprocess(self, item: Any, modality: str) -> torch.Tensor:
        if modality == "video":
            return self.frames(item)  # (F, 3, S, S)
        tiles, (height, width) = self.tiles(item)
        head = torch.tensor([height, width, tiles.shape[0]], dtype=torch.float32)
        return torch.cat([head, tiles.flatten()])  # (HEADER + tiles * 3 * S * S,): only the image's own tiles

    def _unpack(self, items: torch.Tensor | list[torch.Tensor]) -> tuple[list[Size], list[int], list[torch.Tensor]]:
        """Items (stacked, or a list when their tile counts differ) -> sizes, tile counts, (n, 3, S, S) tiles each."""
        s = self.config.tile_size
        sizes, counts, tiles = [], [], []
        for k, item in enumerate(items):
            n = int(round(float(item[2]))) if item.ndim == 1 and item.numel() > HEADER else -1
            if (n < 2 or n > self.max_tiles_in_item or item.numel() != HEADER + n * 3 * s * s
                    or item.dtype not in (torch.float32, torch.float64)):
                raise InputError(f"anyres item {k}: {tuple(item.shape)} {item.dtype} is not a float32 (or float64: "
                                 f"the image size it carries must stay exact) vector from this encoder's preprocess "
                                 f"(height, width, tiles, then 2..{self.max_tiles_in_item} tiles of 3 x {s} x {s})")
            sizes.append((int(round(float(item[0]))), int(round(float(item[1])))))
            counts.append(n)
            tiles.append(item[HEADER:].view(n, 3, s, s))
        return sizes, counts, tiles

    # -- model ---------------------------------------------------------------------------------------------------
    def forward(self, pixels: torch.Tensor | list[torch.Tensor], modality: str) -> torch.Tensor:
        """(N, L) preprocessed items (a list when their tile counts differ) -> (N, W, D): each item's tiles' tokens
        (base first, row-major), zero-padded;
        videos (N, F, 3, S, S) -> (N, F * side^2 + 1, D): every frame's tokens and a slot for the newline."""
        if modality == "video":
            n, f = pixels.shape[:2]
            if f != self._video_frames():
                raise InputError(f"video items must be ({self._video_frames()}, 3, S, S) frames from this encoder's "
                                 f"preprocess, got {tuple(pixels.shape[1:])}")
            dtype = next(self.parameters()).dtype
            feats = self.tower(pixels.flatten(0, 1).to(dtype), "image")  # (N*F, side^2, D)
            feats = feats.reshape(n, -1, feats.shape[-1])
            return torch.cat([feats, feats.new_zeros(n, 1, feats.shape[-1])], dim=1)
        sizes, counts, tiles = self._unpack(pixels)
        real = torch.cat(tiles)  # (sum tiles, 3, S, S)
        dtype = next(self.parameters()).dtype
        feats = self.tower(real.to(dtype), "image")  # (sum tiles, side^2, D)
        if feats.shape[1] != self.side * self.side:
            raise InputError(f"the {self.tower.name} tower gave {feats.shape[1]} tokens per "
                             f"{self.config.tile_size}-pixel tile but describes {self.side * self.side} at its own "
                             f"input size; set tile_size to the tower's image size")
        out = feats.new_zeros(len(counts), self.width, feats.shape[-1])
        for i, chunk in enumerate(feats.split(counts)):
            out[i, : chunk.shape[0] * chunk.shape[1]] = chunk.flatten(0, 1)
        return out

    def _pooled_side(self) -> int:
        return math.ceil(self.side / self.config.video_pool)

    def token_mask(self, items: torch.Tensor | list[torch.Tensor], modality: str) -> torch.Tensor:
        device = items[0].device
        if modality == "video":
            real = self._video_frames() * self._pooled_side() ** 2 + int(self.config.newline)
            return (torch.arange(self.video_width, device=device) < real).expand(len(items), -1)
        sizes, _, _ = self._unpack(items)
        counts = torch.tensor([item_tokens(size, self.config, self.side) for size in sizes], device=device)
        return torch.arange(self.width, device=device)[None] < counts[:, None]  # (N, W)

    def arrange(self, tokens: torch.Tensor, items: torch.Tensor | list[torch.Tensor], modality: str,
                projector: torch.nn.Module) -> torch.Tensor:
        """(N, W, H) projected tile tokens -> (N, W, H): base, then the unpadded grid rows (each ended by the
        projector's image_newline), then zeros; videos: each frame's grid pooled, then one newline."""
        newline = getattr(projector, "image_newline", None) if self.config.newline else None
        if self.config.newline and newline is None:
            raise InputError(f"encoders.{modality} (anyres) has newline: true, but the {projector.name} projector has "
                             f"no image_newline; set newline: true on an mlp or linear projector (or newline: false "
                             f"here)")
        if modality == "video":
            return self._arrange_video(tokens, newline)
        sizes, counts, _ = self._unpack(items)
        out = torch.zeros_like(tokens)
        t = self.side * self.side
        for i, (size, n) in enumerate(zip(sizes, counts, strict=True)):
            rows, cols = grid_of(size, self.config.grid_pinpoints, self.config.tile_size)
            if n != 1 + rows * cols:
                raise InputError(f"anyres item {i}: {n} tiles for a {size[0]}x{size[1]} image, whose grid is "
                                 f"{rows}x{cols} + 1; the item was not made by this encoder's preprocess")
            grid = tokens[i, t: n * t].view(rows, cols, self.side, self.side, -1)
            grid = grid.permute(4, 0, 2, 1, 3).reshape(-1, rows * self.side, cols * self.side)  # (H, R, C)
            keep_r, keep_c = unpadded(grid.shape[1], grid.shape[2], size)
            grid = grid[:, keep_r, keep_c]
            r, c = downscaled(grid.shape[1], grid.shape[2], self.side, self.config.max_tiles)
            if (r, c) != tuple(grid.shape[1:]):
                grid = F.interpolate(grid[None], [r, c], mode="bilinear")[0]
            if newline is not None:
                grid = torch.cat([grid, newline.to(grid.dtype)[:, None, None].expand(-1, r, 1)], dim=2)
            seq = torch.cat([tokens[i, :t], grid.flatten(1).t()])
            out[i, : seq.shape[0]] = seq
        return out

    def _arrange_video(self, tokens: torch.Tensor, newline: torch.Tensor | None) -> torch.Tensor:
        """(N, F * side^2 + 1, H) -> each frame's side x side grid downscaled bilinearly (OneVision's apply_pooling),
        the frames in order, one newline at the end."""
        n, f, side, hidden = tokens.shape[0], self._video_frames(), self.side, tokens.shape[-1]
        grid = tokens[:, : f * side * side].reshape(n * f, side, side, hidden).permute(0, 3, 1, 2)
        pooled = self._pooled_side()
        grid = F.interpolate(grid, [pooled, pooled], mode="bilinear").permute(0, 2, 3, 1).reshape(n, -1, hidden)
        out = torch.zeros_like(tokens)
        out[:, : grid.shape[1]] = grid
        if newline is not None:
            out[:, grid.shape[1]] = newline.to(out.dtype)
        return out
