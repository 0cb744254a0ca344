"""The drawing recipe's data: easy-VQA images with their captions, and the per-step batches the training loop reads.

Every step's batch is a function of (seed, step) alone: the sample order is an epoch-wise
permutation, and the step's own generator draws the horizontal flips, the captions dropped to ""
(so classifier-free guidance has an unconditional model) and then the diffusion noise and
timesteps. A resumed run therefore continues exactly where its checkpoint stopped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mmhub.train.loop import Progress


def load_split(split: str = "train", size: int = 32, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """(N, 3, size, size) pixels in [-1, 1] (area-downsampled) and the N captions of an easy-VQA split."""
    from PIL import Image

    from mmhub.data.easy_vqa import EasyVQAConfig, EasyVQADataset

    ds = EasyVQADataset(EasyVQAConfig(split=split, task="caption", limit=limit))
    pix = np.empty((len(ds), size, size, 3), dtype=np.uint8)
    captions = []
    for i in range(len(ds)):
        s = ds[i]
        im = Image.open(s.media["image"][0]).convert("RGB")
        pix[i] = np.asarray(im if im.size == (size, size) else im.resize((size, size), Image.BOX))
        captions.append(s.messages[-1]["content"])
    x = torch.from_numpy(pix).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    return x.contiguous(), captions


def batch_indices(step: int, n: int, cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Generator]:
    """Indices of `step`'s batch (epoch-wise permutations) and the step's own generator, both from (seed, step)."""
    per_epoch = n // cfg["batch"]
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["seed"] * 100_003 + epoch))
    idx = perm[k * cfg["batch"]:(k + 1) * cfg["batch"]]
    return idx, torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + 7919 * step + 1)


class DrawingBatches:
    """The loop's ``next_batches`` for the recipe: one ``{"pixels", "ids", "generator"}`` batch per step
    (`mmhub.train.objectives.DiffusionLoss` reads it), flipped and caption-dropped as ``cfg`` says."""

    def __init__(self, pixels: torch.Tensor, caption_ids: torch.Tensor, empty_ids: torch.Tensor, cfg: dict[str, Any]):
        self.pixels, self.caption_ids, self.empty_ids, self.cfg = pixels, caption_ids, empty_ids, cfg

    def __call__(self, progress: Progress) -> tuple[list[dict[str, Any]], int]:
        idx, g = batch_indices(progress.global_step, self.pixels.shape[0], self.cfg)
        x = self.pixels[idx]
        ids = self.caption_ids[idx].clone()
        if self.cfg["flip"]:
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        drop = torch.rand(len(idx), generator=g) < self.cfg["uncond_p"]
        ids[drop] = self.empty_ids
        return [{"pixels": x, "ids": ids, "generator": g, "edge_weight": self.cfg.get("edge_weight", 0.0)}], len(idx)
