"""The LLaVA-OneVision family importer: transformers ``llava_onevision`` folders -> anyres(hf_vision) -> mlp -> LM.

LLaVA-OneVision is LLaVA-NeXT's layout (`mmhub.importers.llava_next`: AnyRes tiles, a per-token projector, the
``image_newline`` row ends, base tokens first) with a SigLIP tower, a finer grid of pinpoints and one more step:
``vision_aspect_ratio: anyres_max_N`` downscales (bilinear, after projection) an unpadded grid holding more than
1.1 x N tiles' tokens to about N tiles' worth; the ``anyres`` encoder's ``max_tiles: N`` does the same.

Video: OneVision reads a video's frames through the same tower and projector, pools each frame's token grid 2x
(bilinear, after projection) and ends the video with one ``image_newline``. The import shares the ``anyres`` encoder
between ``image`` and ``video`` (``video_frames`` frames per video: the video processor's ``num_frames``, else
`DEFAULT_FRAMES`; transformers itself takes every frame it is given unless ``do_sample_frames``) and gives ``video``
its own copy of the projector, which starts equal to the image one and trains on its own.

What is not imported: transformers' OneVision treats a sample with several images differently (each image only as
its base, padded to a square, no tiles); mmhub tiles every image on its own, so the import matches transformers for
one image per sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from mmhub.errors import CheckpointError
from mmhub.importers.base import Checkpoint, Imported, Importer, ImportOptions
from mmhub.importers.llava_next import max_tiles_of, next_spec

DEFAULT_FRAMES = 8


def add_video(ckpt: Checkpoint, imported: Imported) -> None:
    """The video slot: the image encoder shared (its video path), a copy of the image projector, the video token."""
    processor_cfg = ckpt.json("processor_config.json") or {}
    video_cfg = ckpt.json("video_preprocessor_config.json") or processor_cfg.get("video_processor")
    if not isinstance(video_cfg, dict):
        imported.notes.append("no video processor config: the model reads images only")
        return
    spec, enc = imported.spec, imported.spec["encoders"]["image"]
    size, tile = video_cfg.get("size") or {}, enc["tile_size"]
    same = (size.get("height"), size.get("width")) == (tile, tile) and all(
        tuple(video_cfg.get(k, enc[v])) == tuple(enc[v]) for k, v in (("image_mean", "mean"), ("image_std", "std")))
    if not same or video_cfg.get("do_resize", True) is False or video_cfg.get("do_normalize", True) is False:
        raise CheckpointError(f"{ckpt.folder}: the video processor (size {size}, mean/std "
                              f"{video_cfg.get('image_mean')}/{video_cfg.get('image_std')}) does not resize frames to "
                              f"the {tile}-pixel tiles with the images' normalisation, which mmhub's video path does")
    tokenizer = ckpt.tokenizer()
    token = getattr(tokenizer, "video_token", None) or processor_cfg.get("video_token") or "<video>"
    token_id = ckpt.config.get("video_token_id", ckpt.config.get("video_token_index"))
    found = tokenizer.convert_tokens_to_ids(token)
    if found != token_id:
        raise CheckpointError(f"{ckpt.folder}: the tokenizer gives {token!r} id {found} but config.video_token_id is "
                              f"{token_id}; the folder is inconsistent")
    frames = int(video_cfg.get("num_frames") or DEFAULT_FRAMES)
    enc["video_frames"] = frames
    spec["encoders"]["video"] = "image"
    spec["projectors"]["video"] = dict(spec["projectors"]["image"])
    spec["placeholders"]["video"] = token
    imported.weights["projectors.video"] = {k: v.clone() for k, v in imported.weights["projectors.image"].items()}
    imported.notes.append(f"video: {frames} frames per video (transformers takes every frame given unless "
                          f"do_sample_frames); its projector starts as a copy of the image one")


class LlavaOnevisionImporter(Importer):
    """LLaVA-OneVision: AnyRes (anyres_max_N) tiles through a SigLIP tower, mlp with image_newline, causal LM."""

    name: ClassVar[str] = "llava_onevision"
    model_types: ClassVar[tuple[str, ...]] = ("llava_onevision",)
    description: ClassVar[str] = ("LLaVA-OneVision: AnyRes tiles (anyres_max_N downscale) -> SigLIP tower -> mlp "
                                  "(+ image_newline) -> causal LM; one image per sample")

    def convert(self, ckpt: Checkpoint, options: ImportOptions) -> Imported:
        aspect = ckpt.config.get("vision_aspect_ratio", "anyres_max_9")
        imported = next_spec(ckpt, options, "llava_onevision", max_tiles_of(aspect, str(ckpt.folder)))
        add_video(ckpt, imported)
        imported.notes.append("one image per sample: transformers' multi-image path (each image as its base only) "
                              "is not imported")
        return imported

    def export(self, model: Any, out: Path) -> Path:
        from mmhub.importers.llava_next_export import export_next

        return export_next(model, out)
