"""Qwen2-VL in mmhub: the dynamic-resolution tower (``qwen2_vl_vision``) + ``patch_merger`` against transformers'
visual model, M-RoPE positions against transformers' ``get_rope_index``, and the ``qwen2_vl`` importer's logits and
greedy generation against ``Qwen2VLForConditionalGeneration`` through the family's own processor."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mmhub.encoders.qwen2_vl_vision import Qwen2VLVisionEncoder, patchify
from mmhub.interfaces import BuildContext
from mmhub.projectors.patch_merger import PatchMergerProjector

VISION = {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "hidden_size": 48, "patch_size": 14,
          "spatial_merge_size": 2, "temporal_patch_size": 2}
PIXELS = {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 12}
FEATURE_TOL = 1e-5
MEASURED: dict[str, float] = {}


def picture(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def perturb(module: torch.nn.Module, std: float, seed: int = 0) -> None:
    """Move every weight away from its initialisation, so that equal outputs mean equal maths."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


def hf_visual() -> Any:
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    model = Qwen2VisionTransformerPretrainedModel._from_config(Qwen2VLVisionConfig(**VISION)).eval()
    perturb(model, 0.2)
    return model


def mmhub_parts(visual: Any) -> tuple[Qwen2VLVisionEncoder, PatchMergerProjector]:
    """mmhub's encoder and projector holding `visual`'s weights (its merger in the projector)."""
    ctx = BuildContext(resolve=lambda uri: uri)
    enc = Qwen2VLVisionEncoder(Qwen2VLVisionEncoder.Config.model_validate({"config": VISION, **PIXELS}), ctx).eval()
    proj_cfg = PatchMergerProjector.Config.model_validate({"in_dim": 32, "out_dim": 48, "merge": 2})
    proj = PatchMergerProjector(proj_cfg, ctx).eval()
    state = visual.state_dict()
    enc.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("merger.")}, strict=True)
    proj.load_state_dict({k[len("merger."):]: v for k, v in state.items() if k.startswith("merger.")}, strict=True)
    return enc, proj


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_tower_and_merger_equal_transformers_visual_model(backend: str) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    visual = hf_visual()
    enc, proj = mmhub_parts(visual)
    # multiples of 28 need no resampling (any backend); other sizes are resized (PIL's bicubic, as mmhub does)
    sizes = [(56, 84), (28, 56)] if backend == "torchvision" else [(50, 70), (90, 33)]
    images = [picture(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    kind = Qwen2VLImageProcessor if backend == "torchvision" else Qwen2VLImageProcessorPil
    inputs = kind(min_pixels=PIXELS["min_pixels"], max_pixels=PIXELS["max_pixels"])(images=images, return_tensors="pt")
    items = [enc.preprocess(im, "image") for im in images]
    grids = torch.tensor([enc.token_grid(x) for x in items])
    assert torch.equal(grids, inputs["image_grid_thw"]), (grids, inputs["image_grid_thw"])
    ours_patches = torch.cat([patchify(x, 14, 2, 2) for x in items])
    pixel_diff = float((ours_patches - inputs["pixel_values"]).abs().max())
    assert pixel_diff < 1e-6, f"{backend}: pixel values differ by {pixel_diff}"
    with torch.no_grad():
        theirs = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        feats = enc(items, "image")
        assert isinstance(feats, list) and [f.shape[0] for f in feats] == grids.prod(-1).tolist()
        ours = torch.cat([proj(f[None])[0] for f in feats])
    diff = float((ours - theirs).abs().max())
    MEASURED[f"tower+merger-{backend}"] = diff
    assert ours.shape == theirs.shape and diff <= FEATURE_TOL, f"{backend}: merged features differ by {diff}"


def test_same_sized_images_come_back_stacked() -> None:
    enc, proj = mmhub_parts(hf_visual())
    items = torch.stack([enc.preprocess(picture(56, 56, seed=i), "image") for i in range(2)])
    with torch.no_grad():
        feats = enc(items, "image")
        assert feats.shape == (2, 16, 32)
        assert proj(feats).shape == (2, 4, 48)
    assert proj.grid_out(enc.token_grid(items[0])) == (1, 2, 2)
