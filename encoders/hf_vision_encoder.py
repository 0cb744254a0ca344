"""Image encoder over a transformers vision tower: CLIP, SigLIP, DINOv2, ViT or any ``AutoModel`` vision config.

This is the tower LLaVA, LLaVA-1.5, Shikra, ChatSpot, mPLUG-Owl and Video-ChatGPT use
(CLIP ViT-L/14 through ``CLIPVisionModel``), and the SigLIP / DINOv2 towers of later
systems. The tower comes from

* ``config``: a transformers config dict with ``model_type`` (``clip_vision_model``,
  ``siglip_vision_model``, ``dinov2``, ``vit``, ... or a full ``clip`` / ``siglip``
  config, whose ``vision_config`` is taken) plus sizes: a randomly initialised tower;
* ``source``: a weight-source URI of a local HF-format folder (``config.json`` +
  ``*.safetensors``). A folder of a full CLIP/SigLIP model (or of a model that wraps
  a vision tower under some prefix, such as ``vision_tower.``) gives its vision part;
  ``config`` then overrides fields of the folder's vision config. Only safetensors
  files are read (never pickles), and nothing is fetched from a model hub.

Tokens are ``hidden_states[select_layer]`` as LLaVA takes them: index 0 is the
embedding output, k the output of block k, negatives count from the end (-1 the last
block, -2 the penultimate one LLaVA uses). ``drop_cls`` removes the prefix tokens (CLS,
plus registers or distillation tokens where the model has them; SigLIP has none) as
LLaVA's ``select_feature: patch`` does; ``drop_cls: false`` is ``cls_patch``.
``final_norm`` applies the tower's final LayerNorm (DINOv2/ViT ``layernorm``,
CLIP/SigLIP ``post_layernorm``) to the selected states.

Preprocessing is torchvision/PIL only: resize the shortest side and centre-crop
(``resize: crop``, CLIP/DINOv2 style; ``crop_pct`` < 1 resizes to
``image_size / crop_pct`` first) or resize to a square (``resize: squash``, SigLIP/ViT
style), then normalise with ``mean``/``std``. Defaults come from the model family,
overridden by a ``preprocessor_config.json`` in the ``source`` folder (its crop or
resize size is the default ``image_size``; else the tower config's), overridden by
the settings. An ``image_size`` other than the tower's own interpolates its position
embeddings. The tower runs (and its features come back) in ``dtype``.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, PretrainedConfig

from mmhub.encoders.image_base import ImageEncoder
from mmhub.hf_attention import hf_attn_implementation
from mmhub.interfaces import BuildContext, ComponentConfig, EncoderFacts
from mmhub.probe import output_shape
from mmhub.weights import load_into

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
# model_type prefix -> (mean, std, resize, crop_pct, interpolation): the families' own image processors
FAMILIES: dict[str, tuple[tuple[float, ...], tuple[float, ...], str, float, str]] = {
    "clip": (CLIP_MEAN, CLIP_STD, "crop", 1.0, "bicubic"),
    "siglip": (HALF, HALF, "squash", 1.0, "bicubic"),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD, "crop", 224 / 256, "bicubic"),
    "vit": (HALF, HALF, "squash", 1.0, "bilinear"),
}
DEFAULT_FAMILY = (IMAGENET_MEAN, IMAGENET_STD, "crop", 1.0, "bicubic")
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
INTERPOLATION = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC",  # torchvision InterpolationMode
                 "lanczos": "LANCZOS"}  # (LANCZOS: PIL images only, which preprocess resizes)


class HFVisionEncoderConfig(ComponentConfig):
    """Settings of `HFVisionEncoder`."""

    config: dict[str, Any] | None = None
    source: str | None = None
    select_layer: int = -2
    drop_cls: bool = True
    final_norm: bool = False
    image_size: int | None = None
    resize: Literal["crop", "squash"] | None = None
    crop_pct: float | None = None
    longest_edge: int | None = Field(
        None, ge=1, description="first resize the longest side to this many pixels, keeping the aspect ratio (the "
        "other side truncated, then rounded up to even), before the resize to the tower's square: Idefics3's and "
        "SmolVLM's processors")
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos"] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _needs_something(self) -> "HFVisionEncoderConfig":
        if self.config is None and self.source is None:
            raise ValueError("give `config` (a transformers config dict with model_type, e.g. clip_vision_model, "
                             "siglip_vision_model, dinov2) or `source` (a local HF-format folder)")
        if self.source is None and "model_type" not in (self.config or {}):
            raise ValueError("`config` needs a model_type (e.g. clip_vision_model, siglip_vision_model, dinov2, vit) "
                             "when there is no source")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct {self.crop_pct} must be in (0, 1]")
        return self


def _folder(config: HFVisionEncoderConfig, ctx: BuildContext) -> Path:
    path = ctx.weights(config.source)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(f"source {config.source!r} ({path}) is not a HF-format folder with a config.json; "
                         f"save one with `model.save_pretrained(folder)`")
    return path


def vision_config(config: HFVisionEncoderConfig, ctx: BuildContext) -> PretrainedConfig:
    """The transformers vision config these settings describe (a full model's ``vision_config`` when it has one)."""
    overrides = dict(config.config or {})
    if config.source is not None:
        cfg = AutoConfig.from_pretrained(str(_folder(config, ctx)), local_files_only=True)
        overrides.pop("model_type", None)
    else:
        cfg = AutoConfig.for_model(overrides.pop("model_type"), **overrides)
        overrides = {}
    if getattr(cfg, "vision_config", None) is not None:  # a full CLIP/SigLIP (or VLM) config: its vision part
        cfg = cfg.vision_config
    for key, value in overrides.items():
        setattr(cfg, key, value)
    if getattr(cfg, "vision_use_head", None):  # SigLIP's attention-pooling head is never used for tokens
        cfg.vision_use_head = False
    for key in ("image_size", "patch_size"):
        if not isinstance(getattr(cfg, key, None), int):
            raise ValueError(f"the {cfg.model_type} config has no integer {key}; mmhub's hf_vision needs a ViT-style "
                             f"tower (patch embedding + blocks), e.g. clip_vision_model, siglip_vision_model, dinov2")
    return cfg


# vision towers transformers' AutoModel does not map (they live inside a VLM class): model_type -> class name
UNMAPPED_TOWERS = {"blip_2_vision_model": "Blip2VisionModel", "instructblip_vision_model": "InstructBlipVisionModel",
                   "instructblipvideo_vision_model": "InstructBlipVideoVisionModel"}


def _build(cfg: PretrainedConfig, dtype: torch.dtype, attn: str) -> torch.nn.Module:
    if cfg.model_type in UNMAPPED_TOWERS:
        import transformers

        return getattr(transformers, UNMAPPED_TOWERS[cfg.model_type])._from_config(cfg, dtype=dtype,
                                                                                  attn_implementation=attn)
    try:
        model_cls = AutoModel._model_mapping[type(cfg)]
    except KeyError:
        raise ValueError(f"transformers has no AutoModel for model_type {cfg.model_type!r}; use a vision tower type "
                         f"such as clip_vision_model, siglip_vision_model, dinov2 or vit") from None
    # ViT-style models add an unused pooler unless told not to
    pooler = "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters
    extra = {"add_pooling_layer": False} if pooler else {}
    return AutoModel.from_config(cfg, dtype=dtype, attn_implementation=attn, **extra)


def _tokens(model: torch.nn.Module, config: HFVisionEncoderConfig, cfg: PretrainedConfig,
            pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, T, hidden) tokens of the selected hidden state."""
    n_layers = cfg.num_hidden_layers
    idx = config.select_layer + n_layers + 1 if config.select_layer < 0 else config.select_layer
    if not 0 <= idx <= n_layers:
        raise ValueError(f"select_layer {config.select_layer} is outside the tower's hidden states (0 = embeddings, "
                         f"1..{n_layers} = blocks, or -1..-{n_layers + 1} from the end)")
    extra = {"interpolate_pos_encoding": True} if pixels.shape[-1] != cfg.image_size else {}
    out = model(pixel_values=pixels, output_hidden_states=True, **extra)
    h = out.hidden_states[idx]
    if config.final_norm:
        norm = getattr(model, "post_layernorm", None) or getattr(model, "layernorm", None)
        if norm is None:
            raise ValueError(f"final_norm: the {cfg.model_type} tower has no post_layernorm/layernorm")
        h = norm(h)
    if config.drop_cls:
        patches = (pixels.shape[-2] // cfg.patch_size) * (pixels.shape[-1] // cfg.patch_size)
        h = h[:, h.shape[1] - patches:]  # CLS / register / distillation tokens come first
    return h


def _preprocessor(folder: Path | None) -> dict[str, Any]:
    """Preprocessing defaults from a folder's preprocessor_config.json (image_size, mean, std, resize, crop_pct,
    interpolation)."""
    path = folder / "preprocessor_config.json" if folder is not None else None
    if path is None or not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    found: dict[str, Any] = {}
    if "image_mean" in raw and "image_std" in raw:
        found["mean"], found["std"] = tuple(raw["image_mean"]), tuple(raw["image_std"])
    if raw.get("resample") in PIL_RESAMPLE:
        found["interpolation"] = PIL_RESAMPLE[raw["resample"]]
    size, crop = raw.get("size"), raw.get("crop_size")
    if raw.get("do_center_crop") and isinstance(size, dict) and "shortest_edge" in size:
        found["resize"] = "crop"
        crop_side = crop.get("height") if isinstance(crop, dict) else crop
        if isinstance(crop_side, int):  # e.g. DINOv2: shortest side 256, crop 224 (its config says 518)
            found["image_size"] = crop_side
            found["crop_pct"] = min(1.0, crop_side / size["shortest_edge"])
    elif isinstance(size, dict) and isinstance(size.get("height"), int):
        found["resize"] = "squash"
        found["image_size"] = size["height"]
    return found


def preprocessing(config: HFVisionEncoderConfig, cfg: PretrainedConfig, folder: Path | None) -> dict[str, Any]:
    """image_size, mean, std, resize, crop_pct, interpolation: family defaults < preprocessor_config.json < settings."""
    family = next((v for k, v in FAMILIES.items() if cfg.model_type.startswith(k)), DEFAULT_FAMILY)
    names = ("mean", "std", "resize", "crop_pct", "interpolation")
    chosen = {"image_size": cfg.image_size, **dict(zip(names, family, strict=True))}
    chosen.update(_preprocessor(folder))
    chosen.update({k: getattr(config, k) for k in chosen if getattr(config, k) is not None})
    if config.longest_edge is not None:
        chosen["longest_edge"] = config.longest_edge
    return chosen


class LongestEdge:
    """PIL image -> the same image with its longest side `size` px, aspect ratio kept, the other side truncated and
    rounded up to even (Idefics3's and SmolVLM's first resize); `resample` is PIL's filter code."""

    def __init__(self, size: int, resample: int):
        self.size, self.resample = size, resample

    def __call__(self, image: Any) -> Any:
        width, height = image.size
        aspect = width / height
        if width >= height:
            width, height = self.size, int(self.size / aspect)
            height += height % 2
        else:
            width, height = int(self.size * aspect), self.size
            width += width % 2
        return image.resize((max(width, 1), max(height, 1)), self.resample)


def build_transform(chosen: dict[str, Any]) -> Any:
    """PIL image -> normalised (3, S, S) tensor (a torchvision ``Compose``), from `preprocessing`'s choices."""
    # torchvision imports torch._dynamo (~1.5 s): only when a transform is built
    from torchvision import transforms as T

    size = chosen["image_size"]
    mode = getattr(T.InterpolationMode, INTERPOLATION[chosen["interpolation"]])
    if chosen["resize"] == "crop":
        steps = [T.Resize(int(math.floor(size / chosen["crop_pct"])), interpolation=mode), T.CenterCrop(size)]
    else:
        steps = [T.Resize((size, size), interpolation=mode)]
    if chosen.get("longest_edge"):
        resample = {v: k for k, v in PIL_RESAMPLE.items()}[chosen["interpolation"]]
        steps.insert(0, LongestEdge(chosen["longest_edge"], resample))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(chosen["mean"], chosen["std"])])


def load_vision_weights(model: torch.nn.Module, folder: Path, what: str) -> None:
    """Load a folder's safetensors into `model`, finding the prefix its vision tower sits under (none,
    ``vision_model.``, ``vision_tower.``, ...). Only the tower's own tensors are read."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded: the files the index names
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (folder / "model.safetensors").is_file():  # not variants such as model.fp16.safetensors beside it
        files = [folder / "model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{what}: {folder} has no *.safetensors file (only safetensors are read, never pickles); "
                         f"re-save it with `save_pretrained(folder, safe_serialization=True)`")
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    own = list(model.state_dict())
    anchor = max(own, key=len)  # the most specific name: fewest accidental suffix matches
    prefixes = [k[: len(k) - len(anchor)] for k in where if k.endswith(anchor)]
    prefixes = sorted((p for p in prefixes if p == "" or p.endswith(".")), key=len)
    for prefix in prefixes:
        if all(prefix + k in where for k in own):
            load_into(model, {k: where[prefix + k].get_tensor(prefix + k) for k in own}, what=what)
            return
    raise ValueError(f"{what}: the tensors in {folder} do not hold this {type(model).__name__} (looked for "
                     f"{anchor!r} under any prefix); the folder is for another architecture")


class HFVisionEncoder(ImageEncoder):
    """A transformers vision tower (CLIP, SigLIP, DINOv2, ViT, any AutoModel vision config) from a chosen layer."""

    name: ClassVar[str] = "hf_vision"
    Config: ClassVar[type[ComponentConfig]] = HFVisionEncoderConfig
    published_weights: ClassVar[bool] = True  # loads the published transformers tower in `source` (preset status)
    library: ClassVar[str] = "transformers"
    out_dim_doc: ClassVar[str] = "the tower's hidden_size"
    tokens_doc: ClassVar[str] = ("(image_size / patch_size)^2 patch tokens, + the prefix tokens (CLS, registers) "
                                 "with drop_cls: false")
    example_settings: ClassVar[dict[str, Any]] = {
        "config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                   "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}}

    @classmethod
    def describe(cls, config: HFVisionEncoderConfig, ctx: BuildContext) -> EncoderFacts:
        cfg = vision_config(config, ctx)
        size = preprocessing(config, cfg, _folder(config, ctx) if config.source is not None else None)["image_size"]
        _, t, c = output_shape(lambda: _build(cfg, torch.float32, "sdpa"), lambda m, x: _tokens(m, config, cfg, x),
                               lambda m: (1, 3, size, size))
        return EncoderFacts(out_dim=c, tokens_per_item=t)

    def __init__(self, config: HFVisionEncoderConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self.hf_config = vision_config(config, ctx)
        self.model = _build(self.hf_config, DTYPES[config.dtype], hf_attn_implementation(ctx.attention))
        folder = _folder(config, ctx) if config.source is not None else None
        if folder is not None:
            load_vision_weights(self.model, folder, what=f"hf_vision weights {config.source}")
        self.transform = build_transform(preprocessing(config, self.hf_config, folder))
        self._out_dim = self.hf_config.hidden_size

    def has_weight_source(self) -> bool:
        return self.config.source is not None

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return _tokens(self.model, self.config, self.hf_config, pixels)  # (N, T, hidden)
