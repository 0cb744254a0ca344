"""`mmhub export MODEL OUT --format gguf`: a LLaVA-shaped model as llama.cpp's pair of GGUF files.

``OUT/<name>.gguf`` holds the language model (`mmhub.export.gguf_llm`) and ``OUT/mmproj-<name>.gguf`` the vision
tower and projector (`mmhub.export.gguf_mmproj`), the pair llama.cpp's ``llama-mtmd-cli -m ... --mmproj ...``,
llama-cpp-python's ``Llava15ChatHandler(clip_model_path=...)`` and Ollama load. The model goes through the same
LLaVA mapping as the transformers export (`mmhub.export.llava_parts`, `mmhub.export.hf_llava`): LoRA adapters are
merged into a copy first, and a model llama.cpp cannot express gets one `ExportError` naming every blocking slot.
Written with gguf-py (llama.cpp's own writer), atomically (nothing is left on failure).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from mmhub.atomic import atomic_dir
from mmhub.errors import ExportError
from mmhub.export.gguf_llm import QUANT_TYPES, llm_problems, tokenizer_facts, write_llm_gguf
from mmhub.export.gguf_mmproj import mmproj_problems, write_mmproj_gguf

CLIP_NOTE = ("llama.cpp's LLaVA graph mishandles the class token of CLIP towers (it appends it after the patches but "
             "reads positions and output rows as if it came first; ggml-org/llama.cpp issue 25814): its image tokens "
             "differ from this model's (max relative difference 1.46 measured with llama-cpp-python 0.3.36, "
             "docs/export.md); SigLIP towers, which have no class token, agree within 1e-3")


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def source_pre_tokenizer(model: Any) -> str | None:
    """llama.cpp's pre-tokenizer name recorded in the backbone's source file, when that file is a GGUF."""
    source = getattr(model.backbone.config, "source", "") or ""
    if not str(source).endswith(".gguf"):
        return None
    import gguf

    path = model.plan.ctx.weight_files.get(source)
    if path is None:
        return None
    field = gguf.GGUFReader(str(path)).get_field("tokenizer.ggml.pre")
    return None if field is None else field.contents()


def gguf_problems(model: Any, pre: str) -> list[str]:
    """Everything that keeps `model` (a LLaVA shape, `check_llava` passed; adapters may still be on) from llama.cpp:
    the vision tower and projector, the language model and the tokenizer, read from configs and the tokenizer alone."""
    from mmhub.export.hf_llava import _vision
    from mmhub.export.llava_parts import llava_parts

    parts = llava_parts(model, allow_adapters=True)
    vision_cfg, _ = _vision(parts)
    lm = parts.backbone.language_model()
    text_cfg = lm.config.get_text_config()
    problems = (mmproj_problems(parts.family, vision_cfg, parts.feature_strategy, parts.activation,
                                parts.linears[1] is not None) + llm_problems(text_cfg))
    rows = max(lm.get_input_embeddings().weight.shape[0], parts.placeholder_id + 1)
    try:
        tokenizer_facts(model.tokenizer, rows, pre, [parts.placeholder])
    except ExportError as exc:
        problems.append(str(exc))
    return problems


def export_gguf(model: Any, out_dir: str | Path, qtype: str = "f16", pre: str | None = None) -> tuple[Path, Path]:
    """Write `model` as ``<name>.gguf`` + ``mmproj-<name>.gguf`` in `out_dir`; returns both paths.

    `qtype`: f32, f16 or q8_0 for the language model's matrices (the mmproj's are f32 for f32, else f16, as
    llama.cpp's own mmproj files). `pre`: llama.cpp's pre-tokenizer name (default: the one recorded in the
    backbone's GGUF source, else ``default``)."""
    from mmhub.export.hf_llava import _meta_llava, _prefixes, llava_config_and_tensors
    from mmhub.export.image_processing import read_transform
    from mmhub.export.llava_parts import check_llava, llava_parts

    if qtype not in QUANT_TYPES:
        raise ExportError(f"--type {qtype!r}: GGUF export writes {', '.join(QUANT_TYPES)}")
    try:
        check_llava(model)
    except ExportError as exc:
        raise ExportError(str(exc).replace("as a transformers LLaVA model", "as GGUF (llama.cpp's LLaVA)")) from None
    pre = pre or source_pre_tokenizer(model) or "default"
    problems = gguf_problems(model, pre)  # all of them, before a merged copy or a tensor is made
    if problems:
        raise ExportError(f"cannot export {model.spec.name!r} as GGUF (llama.cpp's LLaVA): {len(problems)} "
                          "problem(s): " + "; ".join(problems))
    if model.spec.adapters:
        from mmhub.adapters import merged_copy

        model = merged_copy(model)
    parts = llava_parts(model)
    config, tensors = llava_config_and_tensors(model, parts, "float32")
    if parts.family == "clip":
        warnings.warn(CLIP_NOTE, stacklevel=2)
    where = _prefixes(_meta_llava(config))
    text = _under(tensors, where["language"])
    if f"{where['head']}.weight" in tensors:
        text["lm_head.weight"] = tensors[f"{where['head']}.weight"]
    rows = text["embed_tokens.weight"].shape[0]
    tok = tokenizer_facts(model.tokenizer, rows, pre, [parts.placeholder])
    prep = read_transform(parts.encoder.transform, f"encoders.image ({parts.encoder_type})")
    name = model.spec.name
    out = Path(out_dir).expanduser()
    with atomic_dir(out) as tmp:
        llm = write_llm_gguf(tmp / f"{name}.gguf", config.text_config, text, tok, qtype, name)
        mmproj = write_mmproj_gguf(tmp / f"mmproj-{name}.gguf", config.vision_config, _under(tensors, where["vision"]),
                                   _under(tensors, where["projector"]), parts.family, parts.feature_layer,
                                   list(prep.mean), list(prep.std), qtype, name)
    return out / llm.name, out / mmproj.name


def cli_export_gguf(model: Any, out: str, qtype: str | None, pre: str | None) -> int:
    """The ``--format gguf`` branch of ``mmhub export``: write, then say what was written."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm, mmproj = export_gguf(model, out, qtype or "f16", pre)
    for w in caught:
        print(f"note: {w.message}")
    for path in (llm, mmproj):
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(f"run it: llama-mtmd-cli -m {llm} --mmproj {mmproj} --image IMAGE -p PROMPT")
    return 0
