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

Export writes such a model back as the family's transformers folder (Idefics3 or SmolVLM by its tower: config,
safetensors, the processor without image splitting and the chat template template ``idefics3`` renders); a part the
family has no place for is named.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from mmhub.errors import CheckpointError, ExportError
from mmhub.importers.base import Checkpoint, Imported, Importer, ImportOptions
from mmhub.importers.paligemma import image_processor_config, language_tensors, load_exact, settings_of, tower_tensors

FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL resample codes hf_vision resizes with
RESCALE = 1 / 255
# Idefics3's chat template (list content), bos written by the template; SmolVLM's is the same with its bos <|im_start|>
CHAT_TEMPLATE = ("{bos}{{% for message in messages %}}{{{{message['role'] | capitalize}}}}"
                 "{{% if message['content'][0]['type'] == 'image' %}}{{{{':'}}}}{{% else %}}{{{{': '}}}}{{% endif %}}"
                 "{{% for line in message['content'] %}}{{% if line['type'] == 'text' %}}{{{{line['text']}}}}"
                 "{{% elif line['type'] == 'image' %}}{{{{ '<image>' }}}}{{% endif %}}{{% endfor %}}"
                 "<end_of_utterance>\n{{% endfor %}}"
                 "{{% if add_generation_prompt %}}{{{{ 'Assistant:' }}}}{{% endif %}}")
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

    def export(self, model: Any, out: Path) -> Path:
        """`model` (an Idefics3-like tower at its last layer -> pixel_shuffle -> causal LM, template idefics3) as the
        family's transformers folder at `out` (SmolVLM for a smolvlm_vision tower), written through a temporary
        folder beside it."""
        from transformers import AutoConfig

        tower, proj, lm = export_parts(model)
        smolvlm = tower.hf_config.model_type.startswith("smolvlm")
        family = "smolvlm" if smolvlm else "idefics3"
        tok = copy.deepcopy(model.tokenizer)  # the processor adds its tokens in place
        config = AutoConfig.for_model(family, vision_config=tower.hf_config.to_dict(), text_config=lm.config.to_dict(),
                                      scale_factor=proj.config.scale_factor,
                                      image_token_id=tok.convert_tokens_to_ids(model.spec.placeholder("image")),
                                      tie_word_embeddings=bool(lm.config.tie_word_embeddings))
        hf = model_class(family)(config).eval()
        load_exact(hf.model.vision_model, tower.model.state_dict(), "vision tower")
        load_exact(hf.model.connector.modality_projection.proj, proj.proj.state_dict(), "connector")
        load_exact(hf.model.text_model, lm.base_model.state_dict(), "language model")
        if not lm.config.tie_word_embeddings:
            load_exact(hf.lm_head, lm.get_output_embeddings().state_dict(), "lm_head")
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            hf.save_pretrained(str(tmp))
            processor(family, tower, tok, model.plan.tokens_per_item("image")).save_pretrained(str(tmp))
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


def model_class(family: str) -> Any:
    from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

    return SmolVLMForConditionalGeneration if family == "smolvlm" else Idefics3ForConditionalGeneration


def processor(family: str, tower: Any, tokenizer: Any, image_seq_len: int) -> Any:
    """The family's processor doing the tower's preprocessing (read off its transform), without image splitting."""
    steps = {type(s).__name__: s for s in tower.transform.transforms}
    resize, normalize = steps.get("Resize"), steps.get("Normalize")
    first = steps.get("LongestEdge")
    resample = {v: k for k, v in FILTERS.items()}[tower.config.interpolation or "lanczos"]
    side = resize.size[0] if resize is not None and isinstance(resize.size, (list, tuple)) else None
    if side is None or normalize is None:
        raise ExportError(f"encoders.image: preprocessing {' -> '.join(steps)} is not the whole-image resize "
                          f"{family}'s processor does")
    kwargs = {"size": {"longest_edge": first.size if first is not None else side},
              "max_image_size": {"longest_edge": side}, "do_image_splitting": False, "resample": resample,
              "image_mean": list(normalize.mean), "image_std": list(normalize.std)}
    template = CHAT_TEMPLATE.format(bos=tokenizer.bos_token or "")
    if family == "smolvlm":
        from transformers import SmolVLMProcessor, SmolVLMVideoProcessor
        from transformers.models.smolvlm.image_processing_smolvlm import SmolVLMImageProcessor

        return SmolVLMProcessor(image_processor=SmolVLMImageProcessor(**kwargs), tokenizer=tokenizer,
                                video_processor=SmolVLMVideoProcessor(), image_seq_len=image_seq_len,
                                chat_template=template)
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_idefics3 import Idefics3ImageProcessor

    return Idefics3Processor(image_processor=Idefics3ImageProcessor(**kwargs), tokenizer=tokenizer,
                             image_seq_len=image_seq_len, chat_template=template)


def export_parts(model: Any) -> tuple[Any, Any, Any]:
    """The tower, connector and transformers LM of an Idefics3-shaped model; anything else names the blocking part."""
    enc, proj, backbone = model.spec.encoders.get("image"), model.spec.projectors.get("image"), model.spec.backbone
    problems = []
    if list(model.spec.encoders) != ["image"] or enc is None or enc.type != "hf_vision":
        problems.append(f"encoders {', '.join(model.spec.encoders) or '-'} (Idefics3 has one hf_vision image tower)")
    else:
        tower = model.encoders["image"]
        kind = tower.hf_config.model_type
        if kind not in ("idefics3_vision", "smolvlm_vision"):
            problems.append(f"encoders.image: a {kind} tower (Idefics3's is idefics3_vision, SmolVLM's smolvlm_vision)")
        if tower.config.select_layer not in (-1, tower.hf_config.num_hidden_layers) or not tower.config.final_norm:
            problems.append(f"encoders.image: select_layer {tower.config.select_layer}, final_norm "
                            f"{tower.config.final_norm} (Idefics3 reads the last layer after the final LayerNorm)")
    if proj is None or proj.type != "pixel_shuffle":
        problems.append(f"projectors.image: {proj.type if proj else 'none'} (Idefics3's connector is pixel_shuffle)")
    elif model.projectors["image"].config.bias:
        problems.append("projectors.image: pixel_shuffle with a bias (Idefics3's connector has none)")
    lm = model.backbone.language_model() if backbone.type == "hf_causal_lm" else None
    if lm is None:
        problems.append(f"backbone: {backbone.type} (Idefics3's LLM is a causal LM, hf_causal_lm)")
    elif model.backbone.prefix_lm:
        problems.append("backbone: prefix_lm (Idefics3 reads the prompt causally)")
    if model.spec.template != "idefics3":
        problems.append(f"template {model.spec.template!r} (Idefics3's processor and chat template: idefics3)")
    if len(model.injectors) or len(model.generators):
        problems.append("injectors or generators (Idefics3 has neither)")
    if problems:
        raise ExportError("this model cannot be written as a transformers Idefics3/SmolVLM: " + "; ".join(problems))
    return model.encoders["image"], model.projectors["image"], lm
