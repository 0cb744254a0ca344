"""Image encoder over an open_clip vision tower (any architecture, including timm-backed EVA).

Only the vision tower is built (the text tower is never allocated). ``arch`` names
an open_clip architecture, or ``vision_cfg`` gives one as data (open_clip's
``CLIPVisionCfg`` fields) for tiny test models. Tokens come from the block
``select_layer`` (LLaVA uses -2, the penultimate block), with or without the
CLS token (``drop_cls``, LLaVA drops it). ``pretrained`` is a local file or a
weight-source URI holding a full CLIP checkpoint or just the vision tower.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import model_validator

from mmhub.encoders.image_base import ImageEncoder
from mmhub.interfaces import BuildContext, ComponentConfig, EncoderFacts
from mmhub.probe import output_shape
from mmhub.weights import load_into, read_state_dict


class OpenClipEncoderConfig(ComponentConfig):
    """Settings of `OpenClipEncoder`."""

    arch: str | None = "ViT-B-32"
    vision_cfg: dict[str, Any] | None = None
    embed_dim: int = 512
    pretrained: str | None = None
    select_layer: int = -2
    drop_cls: bool = True
    # input resolution override (Qwen-VL: 448); pretrained position embeddings are resampled
    image_size: int | None = None

    @model_validator(mode="after")
    def _arch_or_cfg(self) -> "OpenClipEncoderConfig":
        if self.vision_cfg is None:
            if self.arch is None:
                raise ValueError("give `arch` (an open_clip architecture name) or `vision_cfg`")
            # open_clip imports timm and torchvision (~2 s): only when a config is checked or a model built
            import open_clip

            if self.arch not in open_clip.list_models():
                from mmhub.errors import close_matches

                hint = close_matches(self.arch, open_clip.list_models())
                raise ValueError(f"open_clip has no architecture {self.arch!r}"
                                 + (f"; did you mean {hint}?" if hint else ""))
        if self.select_layer == 0:
            raise ValueError("select_layer counts blocks from 1 (or from the end with negatives); 0 is not a block")
        return self


def _vision_cfg(config: OpenClipEncoderConfig) -> tuple[int, dict[str, Any]]:
    if config.vision_cfg is not None:
        embed_dim, vcfg = config.embed_dim, dict(config.vision_cfg)
    else:
        # open_clip imports timm and torchvision (~2 s): only when a config is checked or a model built
        import open_clip

        full = open_clip.get_model_config(config.arch)
        embed_dim, vcfg = full["embed_dim"], dict(full["vision_cfg"])
    if config.image_size is not None:
        vcfg["image_size"] = config.image_size
    return embed_dim, vcfg


def _resample_positions(tower: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pretrained position embeddings for another resolution -> this tower's grid (bicubic, as open_clip/timm do)."""
    from timm.layers import resample_abs_pos_embed

    own = tower.state_dict()
    for key in ("positional_embedding", "trunk.pos_embed"):
        if key in state and key in own and state[key].shape != own[key].shape:
            pe = state[key]
            squeeze = pe.ndim == 2
            pe = pe[None] if squeeze else pe
            n_prefix = pe.shape[1] - int((pe.shape[1]) ** 0.5) ** 2  # CLS/register tokens kept as they are
            new_tokens = own[key].shape[-2] - n_prefix
            side = int(new_tokens ** 0.5)
            pe = resample_abs_pos_embed(pe, [side, side], num_prefix_tokens=n_prefix)
            state[key] = pe[0] if squeeze else pe
    return state


def _build(config: OpenClipEncoderConfig) -> torch.nn.Module:
    # open_clip imports timm and torchvision (~2 s): only when a config is checked or a model built
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    embed_dim, vcfg = _vision_cfg(config)
    vcfg.pop("timm_model_pretrained", None)
    if "timm_model_name" not in vcfg:
        return _build_vision_tower(embed_dim, CLIPVisionCfg(**vcfg))
    tower = _build_vision_tower(embed_dim, CLIPVisionCfg(**vcfg, timm_model_pretrained=False))
    # open_clip builds timm trunks (EVA) at their native size; resize them to the requested resolution
    size = vcfg.get("image_size", 224)
    if tuple(getattr(tower, "image_size", ())) != (size, size) \
            or getattr(tower.trunk, "patch_embed", None) is not None \
            and tuple(tower.trunk.patch_embed.img_size) != (size, size):
        if not hasattr(tower.trunk, "set_input_size"):
            raise ValueError(f"the timm trunk {vcfg['timm_model_name']} cannot change its input size to {size}; "
                             "use its native image_size")
        tower.set_input_size(size)
    return tower


def _n_blocks(tower: torch.nn.Module) -> int:
    if hasattr(tower, "transformer"):
        return len(tower.transformer.resblocks)
    if hasattr(tower, "trunk") and hasattr(tower.trunk, "blocks"):
        return len(tower.trunk.blocks)
    raise ValueError(f"{type(tower).__name__} towers have no token blocks; use the `timm` encoder for CNN towers")


def _tokens(tower: torch.nn.Module, config: OpenClipEncoderConfig, x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, T, width) tokens of the selected block."""
    n = _n_blocks(tower)
    idx = n + config.select_layer if config.select_layer < 0 else config.select_layer - 1
    if not 0 <= idx < n:
        raise ValueError(f"select_layer {config.select_layer} is outside the tower's {n} blocks")
    if hasattr(tower, "transformer"):
        out = tower.forward_intermediates(x, indices=[idx], intermediates_only=True, output_fmt="NLC",
                                          output_extra_tokens=not config.drop_cls)
        tokens = out["image_intermediates"][0]
        if not config.drop_cls:
            tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)
        return tokens
    res = tower.trunk.forward_intermediates(x, indices=[idx], intermediates_only=True, output_fmt="NLC",
                                            return_prefix_tokens=not config.drop_cls)[0]
    return torch.cat([res[1], res[0]], dim=1) if not config.drop_cls else res


def _image_size(tower: torch.nn.Module, config: OpenClipEncoderConfig) -> int:
    size = _vision_cfg(config)[1].get("image_size", 224)
    return size if isinstance(size, int) else size[0]


class OpenClipEncoder(ImageEncoder):
    """open_clip vision tower (CLIP, EVA-CLIP, SigLIP-style ViTs) tokens from a chosen block."""

    name: ClassVar[str] = "open_clip"
    Config: ClassVar[type[ComponentConfig]] = OpenClipEncoderConfig
    published_weights: ClassVar[bool] = True  # loads the published open_clip checkpoint in `pretrained` (preset status)
    library: ClassVar[str] = "open_clip"
    out_dim_doc: ClassVar[str] = "the tower's width"
    tokens_doc: ClassVar[str] = "(image_size / patch_size)^2, +1 with the CLS token"
    example_settings: ClassVar[dict[str, Any]] = {
        "arch": None, "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 32, "head_width": 16},
        "embed_dim": 32}

    @classmethod
    def describe(cls, config: OpenClipEncoderConfig, ctx: BuildContext) -> EncoderFacts:
        if config.pretrained is not None:
            ctx.weights(config.pretrained)
        size = _image_size(None, config)
        _, t, c = output_shape(lambda: _build(config), lambda m, x: _tokens(m, config, x), lambda m: (1, 3, size, size))
        return EncoderFacts(out_dim=c, tokens_per_item=t)

    def __init__(self, config: OpenClipEncoderConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self.tower = _build(config)
        if config.pretrained is not None:
            state = read_state_dict(ctx.weights(config.pretrained))
            if any(k.startswith("visual.") for k in state):
                state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
            load_into(self.tower, _resample_positions(self.tower, state), what=f"open_clip weights {config.pretrained}")
        size = _image_size(self.tower, config)
        # open_clip imports timm and torchvision (~2 s): only when a config is checked or a model built
        import open_clip

        self.transform = open_clip.image_transform(size, is_train=False)
        with torch.no_grad():
            self._out_dim = _tokens(self.tower.eval(), config, torch.zeros(1, 3, size, size)).shape[-1]

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return _tokens(self.tower, self.config, pixels)  # (N, T, width)
