"""The LLaVA-OneVision family importer: transformers ``llava_onevision`` folders -> anyres(hf_vision) -> mlp -> LM.

LLaVA-OneVision is LLaVA-NeXT's layout (`mmhub.importers.llava_next`: AnyRes tiles, a per-token projector, the
``image_newline`` row ends, base tokens first) with a SigLIP tower, a finer grid of pinpoints and one more step:
``vision_aspect_ratio: anyres_max_N`` downscales (bilinear, after projection) an unpadded grid holding more than
1.1 x N tiles' tokens to about N tiles' worth; the ``anyres`` encoder's ``max_tiles: N`` does the same.

What is not imported: transformers' OneVision treats a sample with several images differently (each image only as
its base, padded to a square, no tiles) and pools video frames; mmhub tiles every image on its own, so the import
matches transformers for one image per sample, and video items are not supported (the video tower part of the
checkpoint is the same tower, so nothing is left unread).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from mmhub.importers.base import Checkpoint, Imported, Importer, ImportOptions
from mmhub.importers.llava_next import max_tiles_of, next_spec


class LlavaOnevisionImporter(Importer):
    """LLaVA-OneVision: AnyRes (anyres_max_N) tiles through a SigLIP tower, mlp with image_newline, causal LM."""

    name: ClassVar[str] = "llava_onevision"
    model_types: ClassVar[tuple[str, ...]] = ("llava_onevision",)
    description: ClassVar[str] = ("LLaVA-OneVision: AnyRes tiles (anyres_max_N downscale) -> SigLIP tower -> mlp "
                                  "(+ image_newline) -> causal LM; one image per sample")

    def convert(self, ckpt: Checkpoint, options: ImportOptions) -> Imported:
        aspect = ckpt.config.get("vision_aspect_ratio", "anyres_max_9")
        imported = next_spec(ckpt, options, "llava_onevision", max_tiles_of(aspect, str(ckpt.folder)))
        imported.notes.append("one image per sample: transformers' multi-image (base only) and video paths are not "
                              "imported")
        return imported

    def export(self, model: Any, out: Path) -> Path:
        from mmhub.importers.llava_next_export import export_next

        return export_next(model, out)
