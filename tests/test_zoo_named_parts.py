"""Presets that name a published system's part compute that part, or say in their status what stands in for it.

* Qwen-VL's resampler reads the final block of its ViT (the authors' ``visual.py`` runs every block, then the
  resampler): the full preset's open_clip tower, rebuilt at a tiny size with the preset's own token settings, hands
  on the output of its last block, not the penultimate one LLaVA reads.
* Flamingo's NFNet-F6 was contrastively pre-trained on image-text pairs and never published; the full preset loads
  timm's ImageNet-classification NFNet-F6, and both its description and its derived status say so.
"""

from __future__ import annotations

from typing import Any

import torch

from mmhub import weights as weight_sources
from mmhub.interfaces import BuildContext
from mmhub.registry import get_registry

REG = get_registry()
TINY_TOWER = {"image_size": 32, "patch_size": 8, "layers": 3, "width": 32, "head_width": 16}


def final_block_tokens_match(image_settings: dict[str, Any]) -> bool:
    """Whether an open_clip encoder with `image_settings`' token choices (its arch swapped for a 3-block tower)
    emits the patch tokens of the tower's last block, as Qwen-VL's ViT hands its resampler."""
    settings = {k: v for k, v in image_settings.items() if k not in ("type", "arch", "pretrained", "image_size")}
    settings.update(arch=None, vision_cfg=TINY_TOWER, embed_dim=32)
    cls = REG.get("encoder", "open_clip").cls
    ctx = BuildContext(resolve=lambda uri: weight_sources.resolve(uri, REG), registry=REG)
    torch.manual_seed(0)
    enc = cls(cls.Config.model_validate(settings), ctx).eval()
    seen: list[torch.Tensor] = []
    hook = enc.tower.transformer.register_forward_hook(lambda m, args, out: seen.append(out))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = enc(pixels, "image")
        enc.tower(pixels)  # the whole tower: every block (the hook sees the last one's output), then pooling
    hook.remove()
    last = seen[-1]  # (N, 1 + patches, width), CLS first
    return tokens.shape == last[:, 1:].shape and torch.equal(tokens, last[:, 1:])


def test_qwen_vl_full_reads_the_final_vit_block() -> None:
    settings = REG.presets["qwen-vl:full"].spec["encoders"]["image"]
    assert settings["drop_cls"] is True
    assert final_block_tokens_match(settings), f"select_layer {settings['select_layer']} is not the ViT's final block"
    # the check can fail: the penultimate block (LLaVA's choice) is told apart
    assert not final_block_tokens_match({**settings, "select_layer": -2})


def test_flamingo_full_says_its_nfnet_is_imagenet_classification_not_contrastive() -> None:
    info = REG.presets["flamingo:full"]
    for where in (info.description, info.status):
        assert "ImageNet-classification NFNet-F6" in where, where
        assert "contrastively pre-trained" in where, where
    assert info.spec["encoders"]["image"]["pretrained"].endswith("dm_nfnet_f6.dm_in1k/model.safetensors")
