"""The Idefics3 / SmolVLM family importer: transformers ``idefics3`` and ``smolvlm`` folders -> hf_vision (their
SigLIP-like tower) -> pixel_shuffle -> Llama (any causal LM).

How the pieces map:

* tower: ``hf_vision`` over the folder's vision config (``idefics3_vision`` / ``smolvlm_vision``: transformers' own
  tower module, whose variable-resolution position buckets reduce to SigLIP's positions on a whole image), its
  ``last_hidden_state`` (``select_layer: -1`` + ``final_norm``); weights from ``model.vision_model.``;
* connector: ``pixel_shuffle`` (``scale_factor`` from the config) with the bias-free ``modality_projection.proj``;
* LLM: ``hf_causal_lm`` over the text config, the head tied or from ``lm_head``;
* text: template ``idefics3`` (``User:``/``Assistant:`` turns ending in ``<end_of_utterance>``, each ``<image>``
  wrapped as the processor wraps a whole image: ``<fake_token_around_image><global-img>`` ... image tokens ...
  ``<fake_token_around_image>``).

Images: mmhub feeds each image whole as the processor does with ``do_image_splitting: false``: its longest side
resized to ``size.longest_edge`` keeping the aspect ratio (hf_vision ``longest_edge``), then to the tower's square
(``max_image_size``), with the processor's filter (LANCZOS) and normalisation: the pixels of transformers' PIL
backend (its torchvision backend resizes tensors and differs slightly). Image splitting (tiles plus the whole image
with row/column tokens) is not reproduced: the import notes say so when the folder's processor splits.
"""

from __future__ import annotations

from typing import Any, ClassVar

from mmhub.errors import CheckpointError
from mmhub.importers.base import Checkpoint, Imported, Importer, ImportOptions
from mmhub.importers.paligemma import image_processor_config, language_tensors, settings_of, tower_tensors

FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL resample codes hf_vision resizes with
RESCALE = 1 / 255
MARKERS = ("<image>", "<fake_token_around_image>", "<end_of_utterance>")  # the tokens template idefics3 writes


def preprocessing(image_cfg: dict[str, Any], tower_size: int, where: str) -> tuple[dict[str, Any], list[str]]:
    """The processor's image settings -> hf_vision settings (whole image, squashed to the tower's square) and notes
    on what mmhub does not reproduce."""
    side = (image_cfg.get("max_image_size") or {}).get("longest_edge", tower_size)
    if side != tower_size:
        raise CheckpointError(f"{where}: max_image_size.longest_edge {side} != the tower's image_size {tower_size}; "
                              f"mmhub feeds the tower whole images at its own size")
    resample = image_cfg.get("resample", 1)
    if resample not in FILTERS:
        raise CheckpointError(f"{where}: resample {resample} (hf_vision resizes with {FILTERS})")
    if image_cfg.get("do_rescale", True) is False or abs(float(image_cfg.get("rescale_factor", RESCALE)) - RESCALE) \
            > 1e-12:
        raise CheckpointError(f"{where}: do_rescale {image_cfg.get('do_rescale')} / rescale_factor "
                              f"{image_cfg.get('rescale_factor')} (hf_vision scales pixels by 1/255)")
    mean, std = image_cfg.get("image_mean", [0.5] * 3), image_cfg.get("image_std", [0.5] * 3)
    if not image_cfg.get("do_normalize", True):
        mean, std = [0.0] * 3, [1.0] * 3
    settings = {"image_size": side, "resize": "squash", "interpolation": FILTERS[resample],
                "mean": tuple(float(x) for x in mean), "std": tuple(float(x) for x in std)}
    notes = []
    if image_cfg.get("do_image_splitting", True):
        notes.append("the processor splits images into tiles plus the whole image; mmhub feeds the whole image only "
                      "(as the processor with do_image_splitting: false)")
    longest = (image_cfg.get("size") or {}).get("longest_edge")
    if image_cfg.get("do_resize", True) and longest is not None:  # the processor's first, aspect-keeping resize
        settings["longest_edge"] = int(longest)
    return settings, notes


class Idefics3Importer(Importer):
    """Idefics3 and SmolVLM: SigLIP-like tower -> pixel shuffle + linear -> Llama."""

    name: ClassVar[str] = "idefics3"
    model_types: ClassVar[tuple[str, ...]] = ("idefics3", "smolvlm")
    description: ClassVar[str] = ("Idefics3 / SmolVLM: SigLIP-like tower -> pixel_shuffle (scale_factor) + linear -> "
                                  "Llama; whole images (no tiling)")

    def convert(self, ckpt: Checkpoint, options: ImportOptions) -> Imported:
        config = ckpt.hf_config()
        vision, text = config.vision_config, config.text_config
        image_cfg, where = image_processor_config(ckpt)
        prep, notes = preprocessing(image_cfg, vision.image_size, f"{ckpt.folder}: {where}")
        scale = int(config.scale_factor)
        grid = vision.image_size // vision.patch_size
        if grid % scale:
            raise CheckpointError(f"{ckpt.folder}: the {grid} x {grid} patch grid does not split into scale_factor "
                                  f"{scale} blocks")
        tokens = (grid // scale) ** 2
        seq = (ckpt.json("processor_config.json") or {}).get("image_seq_len")
        if seq is not None and seq != tokens:
            raise CheckpointError(f"{ckpt.folder}: processor_config.json image_seq_len {seq} != the {tokens} tokens "
                                  f"the tower and pixel shuffle give ({grid}^2 patches / {scale}^2)")
        tokenizer = ckpt.tokenizer()
        vocab = tokenizer.get_vocab()
        missing = [t for t in MARKERS if t not in vocab]
        if missing:
            raise CheckpointError(f"{ckpt.folder}: the tokenizer lacks {', '.join(missing)}; an Idefics3 processor "
                                  f"adds them when it is saved with the tokenizer")
        if vocab["<image>"] != config.image_token_id:
            raise CheckpointError(f"{ckpt.folder}: the tokenizer gives <image> id {vocab['<image>']} but "
                                  f"config.image_token_id is {config.image_token_id}; the folder is inconsistent")
        tied = bool(config.tie_word_embeddings or text.tie_word_embeddings)
        tower = tower_tensors(ckpt, ("model.vision_model.", "vision_model."), "an attention-pooling head is not used")
        proj_prefix = ckpt.first_prefix("model.connector.modality_projection.proj.",
                                        "connector.modality_projection.proj.", what="connector")
        projector = {"proj." + k: v for k, v in ckpt.take(proj_prefix).items()}
        language = language_tensors(ckpt, tied, ("model.text_model.", "text_model."))
        spec = {
            "name": ckpt.folder.name,
            "description": f"imported from the transformers {ckpt.model_type} folder {ckpt.folder}",
            "encoders": {"image": {"type": "hf_vision", "config": settings_of(vision), "select_layer": -1,
                                   "final_norm": True, "drop_cls": False, "dtype": "float32", **prep}},
            "projectors": {"image": {"type": "pixel_shuffle", "scale_factor": scale,
                                     "bias": "proj.bias" in projector}},
            "backbone": {"type": "hf_causal_lm", "config": settings_of(text) | {"tie_word_embeddings": tied},
                         "tokenizer": str(ckpt.folder), "dtype": options.dtype},
            "template": options.template or "idefics3",
            "placeholders": {"image": "<image>"},
        }
        return Imported(spec=spec, weights={"encoders.image.model": tower, "projectors.image": projector,
                                            "backbone.model": language}, notes=notes)
