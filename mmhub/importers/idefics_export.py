"""Export of IDEFICS-shaped mmhub models back to a transformers ``idefics`` folder (the reverse of the importer).

A model has IDEFICS's shape when it is what `mmhub.importers.idefics` builds: an ``hf_vision`` CLIP tower read at
its last block with the CLS token, a ``perceiver`` with ``layout: idefics`` (``ff_mult`` 4, as IDEFICS hard-codes),
one ``gated_xattn`` injector with ``layout: idefics`` whose widths, activation and epsilon are the LM's and whose
marker is the ``<image>`` token, and an ``hf_causal_lm`` LLaMA without biases or grouped heads. Anything else is
an `ExportError` listing every difference. The embedding and head are split back into IDEFICS's decoupled tables
when ``<fake_token_around_image>`` and ``<image>`` are the last two rows (as in the published checkpoints); else
one table (``additional_vocab_size: 0``), which computes the same. The tensors are checked against an
``IdeficsForVisionText2Text`` built on the meta device from the written config; every part is written in the
backbone's dtype (float32 throughout for an exact round trip). LoRA adapters are merged into a copy first.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mmhub.atomic import atomic_dir
from mmhub.errors import ExportError
from mmhub.export.image_processing import read_transform
from mmhub.importers.idefics import FAKE_TOKEN, GATED_NAMES, IMAGE_TOKEN, PERCEIVER_NAMES

WEIGHTS = "model.safetensors"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _parts(model: Any) -> tuple[Any, Any, Any, Any]:
    """(encoder, projector, injector, backbone) of an IDEFICS-shaped model; ExportError naming every difference."""
    problems: list[str] = []
    enc = model.encoders["image"] if "image" in model.encoders else None
    proj = model.projectors["image"] if "image" in model.projectors else None
    injectors = list(model.injectors.values())
    inj = injectors[0] if len(injectors) == 1 else None
    backbone = model.backbone
    if set(model.encoders) != {"image"}:
        problems.append(f"encoders {sorted(model.encoders)} (IDEFICS has one image encoder)")
    if enc is not None:
        cfg = enc.config
        tower = getattr(enc, "hf_config", None)
        if enc.name != "hf_vision" or tower is None or tower.model_type != "clip_vision_model":
            problems.append(f"encoders.image is {enc.name} {getattr(tower, 'model_type', '')} (IDEFICS's tower is "
                            f"a CLIP vision transformer: hf_vision on clip_vision_model)")
        elif cfg.select_layer not in (-1, tower.num_hidden_layers) or cfg.drop_cls or cfg.final_norm:
            problems.append(f"encoders.image reads select_layer {cfg.select_layer}, drop_cls {cfg.drop_cls}, "
                            f"final_norm {cfg.final_norm} (IDEFICS reads the last block with the CLS token and no "
                            f"final LayerNorm: -1, false, false)")
    if proj is None or proj.name != "perceiver" or proj.config.layout != "idefics" or proj.config.ff_mult != 4:
        problems.append("projectors.image is not a perceiver with layout idefics and ff_mult 4")
    text = backbone.language_model().config.get_text_config() if backbone.language_model() is not None else None
    if backbone.name != "hf_causal_lm" or text is None or text.model_type != "llama":
        problems.append(f"the backbone is {backbone.name} {getattr(text, 'model_type', '')} (IDEFICS's LM is "
                        f"LLaMA: hf_causal_lm on a llama config)")
    elif (text.num_key_value_heads != text.num_attention_heads or text.attention_bias or text.mlp_bias
          or getattr(text, "head_dim", None) not in (None, text.hidden_size // text.num_attention_heads)):
        problems.append("the LLaMA has grouped key/value heads, biases or its own head_dim (IDEFICS has none)")
    if inj is None or inj.name != "gated_xattn" or inj.config.layout != "idefics":
        problems.append(f"injectors {sorted(model.injectors)} (IDEFICS has one gated_xattn with layout idefics)")
    elif text is not None and text.model_type == "llama":
        c = inj.config
        want = {"heads": text.num_attention_heads, "ff_dim": text.intermediate_size, "activation": text.hidden_act,
                "norm_eps": text.rms_norm_eps, "marker_token": IMAGE_TOKEN, "modalities": ["image"],
                "only_immediate": True, "reset_token": model.tokenizer.eos_token}
        have = {**c.model_dump(), "ff_dim": c.ff_dim or c.dim * c.ff_mult}
        problems += [f"injector {k} {have[k]!r} != {v!r}" for k, v in want.items() if have[k] != v]
        if c.num_layers % c.every:
            problems.append(f"injector every {c.every} does not divide the {c.num_layers} layers")
    if model.spec.placeholder("image") != IMAGE_TOKEN:
        problems.append(f"the image placeholder is {model.spec.placeholder('image')!r}, not {IMAGE_TOKEN}")
    if problems:
        raise ExportError("this model does not have IDEFICS's shape, so it cannot be written as a transformers "
                          "idefics folder: " + "; ".join(problems))
    return enc, proj, inj, backbone


def _additional_rows(tokenizer: Any, rows: int) -> int:
    """2 when IDEFICS's two tokens are the table's last rows (its decoupled layout), else 0 (one table)."""
    ids = sorted(tokenizer.convert_tokens_to_ids([FAKE_TOKEN, IMAGE_TOKEN]))
    return 2 if ids == [rows - 2, rows - 1] else 0


def _reverse(names: dict[str, str], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``<i>.<mmhub name>`` keys -> ``<i>.<IDEFICS name>``."""
    back = {v: k for k, v in names.items()}
    out = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        hit = next((n for n in sorted(back, key=len, reverse=True) if rest == n or rest.startswith(n + ".")), None)
        if hit is None:
            raise ExportError(f"tensor {key!r} has no IDEFICS counterpart")
        out[f"{index}.{back[hit]}{rest[len(hit):]}"] = value
    return out


def idefics_config_and_tensors(model: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """The ``IdeficsConfig`` and the tensors (transformers' key names) of an IDEFICS-shaped model."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    enc, proj, inj, backbone = _parts(model)
    lm = backbone.language_model()
    text = lm.config.get_text_config()
    dtype = next(lm.parameters()).dtype
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    tied = emb.weight.data_ptr() == head.weight.data_ptr()
    extra = _additional_rows(model.tokenizer, emb.num_embeddings)
    tower, pc, ic = enc.hf_config, proj.config, inj.config
    size = read_transform(enc.transform, "encoders.image (hf_vision)").image_size
    config = IdeficsConfig(
        vocab_size=emb.num_embeddings - extra, additional_vocab_size=extra, hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads, hidden_act=text.hidden_act, rms_norm_eps=text.rms_norm_eps,
        max_position_embeddings=text.max_position_embeddings, rope_parameters=dict(text.rope_parameters),
        tie_word_embeddings=tied, pad_token_id=text.pad_token_id, bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id, cross_layer_interval=ic.every, qk_layer_norms=ic.qk_norm,
        alpha_type=ic.gate, use_resampler=True, freeze_text_layers=False, freeze_vision_layers=False,
        vision_config={"embed_dim": tower.hidden_size, "image_size": size, "patch_size": tower.patch_size,
                       "num_hidden_layers": tower.num_hidden_layers, "num_attention_heads": tower.num_attention_heads,
                       "intermediate_size": tower.intermediate_size, "hidden_act": tower.hidden_act,
                       "layer_norm_eps": tower.layer_norm_eps, "num_channels": tower.num_channels},
        perceiver_config={"use_resampler": True, "resampler_n_latents": pc.num_latents,
                          "resampler_depth": pc.depth, "resampler_n_heads": pc.heads,
                          "resampler_head_dim": proj.idefics_head_dim(pc), "qk_layer_norms_perceiver": pc.qk_norm})
    config.dtype = DTYPE_NAMES.get(dtype, "float32")
    tensors = {f"model.vision_model.{k}": v for k, v in enc.model.state_dict().items()}
    pstate = {k: v for k, v in proj.state_dict().items()}
    blocks = {k[len("layers."):]: v for k, v in pstate.items() if k.startswith("layers.")}
    tensors.update({f"model.perceiver_resampler.blocks.{k}": v for k, v in _reverse(PERCEIVER_NAMES, blocks).items()})
    tensors["model.perceiver_resampler.latents"] = pstate["latents"]
    tensors.update({f"model.perceiver_resampler.layer_norm.{k[5:]}": v for k, v in pstate.items()
                    if k.startswith("norm.")})
    layers = {k[len("layers."):]: v for k, v in inj.state_dict().items() if k.startswith("layers.")}
    tensors.update({f"model.gated_cross_attn_layers.{k}": v for k, v in _reverse(GATED_NAMES, layers).items()})
    base = dict(lm.base_model.state_dict())
    table = base.pop("embed_tokens.weight")
    tensors.update({f"model.{k}": v for k, v in base.items()})
    rows = table.shape[0] - extra
    tensors["model.embed_tokens.weight"] = table[:rows]
    if extra:
        tensors["model.embed_tokens.additional_embedding.weight"] = table[rows:]
    if not tied:
        tensors["lm_head.weight"] = head.weight[:rows]
        if extra:
            tensors["lm_head.additional_fc.weight"] = head.weight[rows:]
    with torch.device("meta"):
        ref = IdeficsForVisionText2Text(config)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()
            if not (tied and k.startswith("lm_head."))}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    wrong = [f"{k} {got[k]} != {want[k]}" for k in sorted(set(want) & set(got)) if got[k] != want[k]]
    missing, extra_keys = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra_keys or wrong:
        raise ExportError(f"the IDEFICS tensors do not match transformers' IdeficsForVisionText2Text: {len(missing)} "
                          f"missing (e.g. {missing[:3]}), {len(extra_keys)} unexpected (e.g. {extra_keys[:3]}), "
                          f"{len(wrong)} of another shape (e.g. {wrong[:3]})")
    return config, {k: v.detach().to(dtype).contiguous().cpu() for k, v in tensors.items()}


def _processor(model: Any, enc: Any) -> Any:
    from transformers import IdeficsImageProcessor, IdeficsProcessor

    prep = read_transform(enc.transform, "encoders.image (hf_vision)")
    if prep.resize != "squash":
        raise ExportError(f"encoders.image resizes by {prep.resize} (shortest side + centre crop); IDEFICS's image "
                          f"processor resizes to a square: set resize: squash")
    images = IdeficsImageProcessor(image_size=prep.image_size, image_mean=list(prep.mean), image_std=list(prep.std),
                                   resample=prep.filter)
    return IdeficsProcessor(images, copy.deepcopy(model.tokenizer))


def export_idefics(model: Any, out_dir: str | Path) -> Path:
    """Write `model` (an IDEFICS-shaped `MMModel`) as a transformers ``idefics`` folder with its processor."""
    from transformers import GenerationConfig

    out = Path(out_dir).expanduser()
    if model.spec.adapters:
        from mmhub.adapters import merged_copy

        model = merged_copy(model)
    config, tensors = idefics_config_and_tensors(model)
    processor = _processor(model, model.encoders["image"])
    generation = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                  pad_token_id=config.pad_token_id)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out
