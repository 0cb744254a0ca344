"""Image encoder over any timm model: a CNN feature map or a ViT token sequence, at any layer.

``model`` is any timm architecture name (built with ``pretrained=False``; real
weights come from ``pretrained``, a local state-dict file or weight-source URI).
``layer`` picks an intermediate block (negative counts from the end), ``pool``
average-pools a feature map to ``pool x pool`` tokens, and ViT prefix tokens
(CLS/registers) are dropped unless ``drop_prefix_tokens`` is false.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from mmhub.encoders.image_base import ImageEncoder
from mmhub.interfaces import BuildContext, ComponentConfig, EncoderFacts
from mmhub.probe import output_shape
from mmhub.weights import load_into, read_state_dict


class TimmEncoderConfig(ComponentConfig):
    """Settings of `TimmEncoder`."""

    model: str = "resnet18"
    pretrained: str | None = None
    match_keys: Literal["name", "order"] = "name"
    model_kwargs: dict[str, Any] = {}
    image_size: int | None = None
    layer: int | None = None
    pool: int | None = None
    drop_prefix_tokens: bool = True


def _create(config: TimmEncoderConfig, headless: bool = True) -> torch.nn.Module:
    kwargs = dict(config.model_kwargs)
    if config.image_size is not None and "img_size" not in kwargs and _is_vit_like(config.model):
        kwargs["img_size"] = config.image_size
    if headless:
        kwargs["num_classes"] = 0
    import timm  # timm imports torchvision (~1.5 s): only when a model is described or built

    return timm.create_model(config.model, pretrained=False, **kwargs)


def _load_pretrained(model: torch.nn.Module, config: TimmEncoderConfig, state: dict, what: str) -> torch.nn.Module:
    """Load `state` into `model`; a checkpoint that still carries the classifier head (as released ImageNet
    checkpoints do) loads into the model with its head, which is then dropped."""
    if len(state) != len(model.state_dict()):
        headed = _create(config, headless=False)
        if len(headed.state_dict()) == len(state):
            load_into(headed, state, config.match_keys, what=what)
            headed.reset_classifier(0)
            return headed
    load_into(model, state, config.match_keys, what=what)
    return model


def _is_vit_like(name: str) -> bool:
    return any(k in name for k in ("vit", "deit", "eva", "beit", "siglip", "dinov"))


def _tokens(model: torch.nn.Module, config: TimmEncoderConfig, x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, T, C) feature tokens."""
    if config.layer is None:
        f = model.forward_features(x)
        if f.ndim == 3 and config.drop_prefix_tokens:
            f = f[:, getattr(model, "num_prefix_tokens", 0):]
    else:
        f = model.forward_intermediates(x, indices=[config.layer], intermediates_only=True)[0]
        if f.ndim == 3 and config.drop_prefix_tokens:
            f = f[:, getattr(model, "num_prefix_tokens", 0):]
    if f.ndim == 4:  # (N, C, h, w) feature map
        if config.pool is not None:
            f = F.adaptive_avg_pool2d(f, config.pool)
        f = f.flatten(2).transpose(1, 2)  # (N, h*w, C)
    return f


def _input_size(model: torch.nn.Module, config: TimmEncoderConfig) -> tuple[int, int, int]:
    # timm imports torchvision (~1.5 s): only when a model is described or built
    from timm.data import resolve_data_config

    size = resolve_data_config({}, model=model)["input_size"]
    if config.image_size is not None:
        size = (size[0], config.image_size, config.image_size)
    return tuple(size)


class TimmEncoder(ImageEncoder):
    """Any timm image model as an encoder (CNNs incl. NFNet and EfficientNet, ViTs, EVA)."""

    name: ClassVar[str] = "timm"
    Config: ClassVar[type[ComponentConfig]] = TimmEncoderConfig
    published_weights: ClassVar[bool] = True  # loads the published timm checkpoint in `pretrained` (preset status)
    library: ClassVar[str] = "timm"
    out_dim_doc: ClassVar[str] = "the model's feature width at the chosen layer"
    tokens_doc: ClassVar[str] = "h*w of the feature map (pool*pool when pooled), or the ViT patch count"
    example_settings: ClassVar[dict[str, Any]] = {"model": "resnet10t", "image_size": 64}

    @classmethod
    def describe(cls, config: TimmEncoderConfig, ctx: BuildContext) -> EncoderFacts:
        if config.pretrained is not None:
            ctx.weights(config.pretrained)  # a missing file is reported before anything is built
        _, t, c = output_shape(lambda: _create(config), lambda m, x: _tokens(m, config, x),
                               lambda m: (1, *_input_size(m, config)))
        return EncoderFacts(out_dim=c, tokens_per_item=t)

    def __init__(self, config: TimmEncoderConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self.model = _create(config)
        if config.pretrained is not None:
            self.model = _load_pretrained(self.model, config, read_state_dict(ctx.weights(config.pretrained)),
                                          what=f"timm {config.model} weights {config.pretrained}")
        # timm imports torchvision (~1.5 s): only when a model is described or built
        from timm.data import create_transform, resolve_data_config

        data = resolve_data_config({}, model=self.model)
        if config.image_size is not None:
            data["input_size"] = (3, config.image_size, config.image_size)
            data["crop_pct"] = 1.0
        self.transform = create_transform(**data, is_training=False)
        self._out_dim = _tokens_probe_dim(self.model, config, data["input_size"])

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return _tokens(self.model, self.config, pixels)  # (N, T, C)


def _tokens_probe_dim(model: torch.nn.Module, config: TimmEncoderConfig, size: tuple[int, ...]) -> int:
    feat = getattr(model, "num_features", None)
    if config.layer is None and isinstance(feat, int):
        return feat
    was = model.training
    model.eval()
    with torch.no_grad():
        out = _tokens(model, config, torch.zeros(1, *size))
    model.train(was)
    return out.shape[-1]
