"""mmhub's image preprocessing <-> a transformers image processor (CLIPImageProcessor / SiglipImageProcessor).

An ``hf_vision`` encoder preprocesses with torchvision on PIL images: resize the
shortest side to R and centre-crop S (``resize: crop``) or resize to S x S
(``resize: squash``), then scale to [0, 1] and normalise. `read_transform` reads those
steps off the encoder's transform, `image_processor` writes the transformers image
processor doing the same (PIL resampling filter code, ``shortest_edge``/``crop_size``
or ``height``/``width``, mean/std), and `hf_vision_settings` maps a processor config
(``preprocessor_config.json``) back to ``hf_vision`` settings.

What stays different: transformers' processors default to their torchvision backend,
whose antialiased bicubic resize of uint8 tensors differs from PIL's by up to one grey
level (0.015 after CLIP normalisation); ``AutoProcessor.from_pretrained(dir,
backend="pil")`` resizes with PIL like mmhub, bit for bit. And torchvision's
``CenterCrop`` (mmhub) rounds an odd margin half-to-even where transformers floors it,
so when the resized long side exceeds the crop by 4k+3 pixels the crop window sits one
pixel apart. Images whose shortest side already equals the crop size, and square
images, are preprocessed identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from torchvision import transforms as T

from mmhub.errors import ExportError

PIL_FILTERS = {T.InterpolationMode.NEAREST: 0, T.InterpolationMode.BILINEAR: 2, T.InterpolationMode.BICUBIC: 3}
FILTER_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic"}
RESCALE = 1 / 255
# open_clip's steps that leave mmhub's images (already PIL RGB) unchanged, or are ToTensor by another name
RGB_STEPS = ("MaybeConvertMode", "_convert_to_rgb")
TO_TENSOR = {"MaybeToTensor": "ToTensor"}
# processor switches mmhub's hf_vision preprocessing has no counterpart for, when on
UNSUPPORTED_SWITCHES = ("do_pad", "do_image_splitting", "do_reduce_labels", "do_flip_channel_order")


@dataclass(frozen=True)
class Preprocessing:
    """What an hf_vision transform does to a PIL image."""

    image_size: int  # the side of the square the tower sees
    resize: Literal["crop", "squash"]
    shortest_edge: int  # crop: the shortest side after resizing, before the centre crop
    filter: int  # PIL resampling filter code (0 nearest, 2 bilinear, 3 bicubic)
    mean: tuple[float, ...]
    std: tuple[float, ...]


def read_transform(transform: Any, where: str) -> Preprocessing:
    """The steps of an image encoder's ``T.Compose`` transform (hf_vision's, or open_clip's with its RGB conversion);
    anything else is an ExportError naming `where`."""
    steps = [s for s in getattr(transform, "transforms", [])
             if (getattr(s, "__name__", None) or type(s).__name__) not in RGB_STEPS]
    kinds = [TO_TENSOR.get(type(s).__name__, type(s).__name__) for s in steps]
    if kinds not in (["Resize", "CenterCrop", "ToTensor", "Normalize"], ["Resize", "ToTensor", "Normalize"]):
        raise ExportError(f"{where}: its preprocessing is {' -> '.join(kinds) or type(transform).__name__}, not the "
                          f"resize (+ centre crop) -> to tensor -> normalise that transformers' image processors do")
    resize, norm = steps[0], steps[-1]
    if resize.interpolation not in PIL_FILTERS:
        raise ExportError(f"{where}: interpolation {resize.interpolation.value} has no PIL resampling filter in "
                          f"transformers' image processors (use bicubic, bilinear or nearest)")
    mean, std = tuple(float(x) for x in norm.mean), tuple(float(x) for x in norm.std)
    if len(steps) == 4:
        crop = steps[1].size
        side, short = int(crop[0]), resize.size
        if isinstance(short, (list, tuple)):
            short = short[0] if len(short) == 1 else None
        if short is None or crop[0] != crop[1]:
            raise ExportError(f"{where}: resize {resize.size} then crop {crop} is not a square centre crop after a "
                              f"shortest-side resize")
        return Preprocessing(side, "crop", int(short), PIL_FILTERS[resize.interpolation], mean, std)
    size = resize.size
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]):
        raise ExportError(f"{where}: resize to {size} without a crop does not give a square image")
    return Preprocessing(int(size[0]), "squash", int(size[0]), PIL_FILTERS[resize.interpolation], mean, std)


def image_processor(prep: Preprocessing, family: str) -> Any:
    """A transformers image processor reproducing `prep` (SiglipImageProcessor for a SigLIP squash, else CLIP's)."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    common = dict(do_resize=True, resample=prep.filter, do_rescale=True, rescale_factor=RESCALE, do_normalize=True,
                  image_mean=list(prep.mean), image_std=list(prep.std), do_convert_rgb=True)
    square = {"height": prep.image_size, "width": prep.image_size}
    if prep.resize == "squash" and family == "siglip":
        return SiglipImageProcessor(size=square, **common)
    if prep.resize == "squash":
        return CLIPImageProcessor(size=square, do_center_crop=False, crop_size=square, **common)
    return CLIPImageProcessor(size={"shortest_edge": prep.shortest_edge}, do_center_crop=True, crop_size=square,
                              **common)


def _crop_pct(side: int, shortest: int, where: str) -> float:
    """The crop_pct for which hf_vision's ``floor(side / crop_pct)`` is exactly `shortest`."""
    if side > shortest:
        raise ExportError(f"{where}: crop_size {side} is larger than the resized shortest edge {shortest}")
    pct = side / shortest
    for _ in range(4):
        if math.floor(side / pct) == shortest:
            return pct
        pct = math.nextafter(pct, 0.0)
    raise ExportError(f"{where}: no crop_pct gives a resize to {shortest} before a {side} crop")


def hf_vision_settings(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``preprocessor_config.json`` dict -> hf_vision settings (image_size, resize, crop_pct, interpolation, mean,
    std); what hf_vision cannot do is an ExportError naming the key and value."""
    problems = []
    for key in UNSUPPORTED_SWITCHES:
        if raw.get(key):
            problems.append(f"{key}: true (mmhub's hf_vision has no such step)")
    if raw.get("do_resize", True) is False:
        problems.append("do_resize: false (hf_vision always resizes to the tower's square input)")
    if raw.get("do_rescale", True) is False or abs(float(raw.get("rescale_factor", RESCALE)) - RESCALE) > 1e-12:
        problems.append(f"do_rescale {raw.get('do_rescale')} / rescale_factor {raw.get('rescale_factor')} (hf_vision "
                        f"scales pixels by 1/255)")
    resample = raw.get("resample", 3)
    if resample not in FILTER_NAMES:
        problems.append(f"resample: {resample} (hf_vision resizes with nearest 0, bilinear 2 or bicubic 3)")
    size, crop = raw.get("size") or {}, raw.get("crop_size")
    settings: dict[str, Any] = {}
    if raw.get("do_center_crop") and "shortest_edge" in size:
        crop = crop if isinstance(crop, dict) else {"height": crop, "width": crop}
        if crop.get("height") != crop.get("width") or not isinstance(crop.get("height"), int):
            problems.append(f"crop_size: {raw.get('crop_size')} (hf_vision crops a square)")
        else:
            side = crop["height"]
            settings.update(image_size=side, resize="crop", crop_pct=_crop_pct(side, int(size["shortest_edge"]), where))
    elif (isinstance(size.get("height"), int) and size.get("height") == size.get("width")
          and not raw.get("do_center_crop")):
        settings.update(image_size=size["height"], resize="squash")
    else:
        problems.append(f"size {size} with do_center_crop {raw.get('do_center_crop')} (hf_vision needs a shortest-edge "
                        f"resize + square centre crop, or a resize to a square)")
    if problems:
        raise ExportError(f"{where}: the image processor cannot be expressed as hf_vision preprocessing: "
                          + "; ".join(problems))
    if raw.get("do_normalize", True):
        mean, std = raw.get("image_mean"), raw.get("image_std")
        if mean is None or std is None:
            raise ExportError(f"{where}: do_normalize is on but image_mean/image_std are missing")
        mean = [mean] * 3 if isinstance(mean, (int, float)) else mean
        std = [std] * 3 if isinstance(std, (int, float)) else std
        settings.update(mean=tuple(float(x) for x in mean), std=tuple(float(x) for x in std))
    else:
        settings.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    settings["interpolation"] = FILTER_NAMES[resample]
    return settings
