"""``objective: blip2_qformer``: BLIP-2's first stage, the Q-Former trained on (image, caption) pairs: ITC, ITM, ITG.

The stage reads ordinary captioning samples (an image and the caption as the assistant turn, e.g.
the ``plain`` template's pretraining data): each sample's caption is the text of its target tokens.
The image goes through the encoder (or the feature cache, when it is frozen) and the Q-Former
projector computes the three losses itself (its ``pretrain_losses``: `mmhub.projectors.qformer_pretrain`
for the qformer's ``pretrain_heads``); the LLM is not run. The step's loss is their sum, a mean over
the batch's pairs, so the objective counts pairs. Negatives (ITC's and ITM's hard ones) come from
the micro-batch; it runs on one process (LAVIS gathers them over all GPUs).
"""

from __future__ import annotations

from typing import Any

import torch

from mmhub.errors import MMHubError
from mmhub.spec import StageSpec
from mmhub.splice import IGNORE


def pretraining_modality(model: Any, stage: StageSpec) -> str:
    """The modality whose projector carries the first-stage heads; a named error when none does."""
    found = [m for m, p in model.projectors.items()
             if callable(getattr(p, "pretrain_losses", None)) and getattr(p.config, "pretrain_heads", False)]
    if not found:
        raise MMHubError(f"stage {stage.name!r} has objective: blip2_qformer, but no projector carries BLIP-2's "
                         "first-stage heads; set the image projector to {type: qformer, layout: blip2, "
                         "pretrain_heads: true, text_tokenizer: ...}")
    if len(found) > 1:
        raise MMHubError(f"stage {stage.name!r}: projectors {', '.join(found)} all carry first-stage heads; "
                         "set pretrain_heads: true on one of them")
    if stage.pack:
        raise MMHubError(f"stage {stage.name!r}: objective blip2_qformer pairs each image with its own caption, "
                         f"so rows cannot be packed; remove pack: {stage.pack}")
    return found[0]


class Blip2QFormerLoss:
    """ITC + ITM + ITG of the Q-Former on the micro-batch's (image, caption) pairs, summed over pairs."""

    count_key = "pairs"
    pairs = False

    def __init__(self, model: Any, stage: StageSpec, generator: torch.Generator | None = None):
        self.model = model
        self.modality = pretraining_modality(model, stage)
        self.generator = generator
        self._stats: dict[str, float] = {}

    def prepare(self, batch: dict[str, Any], ordered: list[Any]) -> None:
        """Adds ``captions``: each sample's target text, the caption of its one image."""
        tok = self.model.processor.tokenizer
        captions = []
        for enc in ordered:
            n = len(enc.media.get(self.modality, [])) + len(getattr(enc, "features", {}).get(self.modality, []))
            if n != 1:
                raise MMHubError(f"objective blip2_qformer pairs one {self.modality} with one caption; sample "
                                 f"{enc.index} has {n} {self.modality} items")
            target = [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE]
            captions.append(tok.decode(target, skip_special_tokens=True).strip())
        batch["captions"] = captions

    def loss(self, model: Any, batch: dict[str, Any], stage: Any) -> tuple[torch.Tensor, int]:
        if hasattr(model, "module"):  # DDP / FSDP: calling the projector directly would skip the gradient sync
            raise MMHubError(f"stage {getattr(stage, 'name', '?')!r}: objective blip2_qformer runs on one process; "
                             "launch the stage without multiple processes")
        m, inner = self.modality, self.model
        features = batch["features"].get(m)
        if features is None:
            features = inner.encode_features({m: batch["media"][m]})[m]
        losses = inner.projectors[m].pretrain_losses(features.to(inner.device), batch["captions"], self.generator)
        total = losses["itc"] + losses["itm"] + losses["itg"]
        n = len(batch["captions"])
        self._stats = {k: float(v.detach()) for k, v in losses.items()}
        return total.float() * n, n

    def stats(self) -> dict[str, float]:
        return dict(self._stats)
