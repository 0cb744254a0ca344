"""The model pair of `benchmarks.llava`: one mmhub LLaVA (CLIP tower, MLP projector, Llama) built from configs,
exported with `export_hf_llava`, and transformers' `LlavaForConditionalGeneration` loaded from that folder (same
weights); plus the synthetic data both sides see (random token ids, random pixels)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmhub import MMModel, build
from mmhub.export import export_hf_llava
from mmhub.processor import Encoded
from mmhub.splice import IGNORE

SIZES: dict[str, dict[str, Any]] = {
    # ~12M-parameter CLIP tower (49 patches + CLS, CLS dropped), 55M-parameter Llama with a 32000 vocabulary
    "default": {
        "clip": {"model_type": "clip_vision_model", "hidden_size": 384, "intermediate_size": 1536,
                 "num_hidden_layers": 6,
                 "num_attention_heads": 6, "image_size": 224, "patch_size": 32},
        "llama": {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
                  "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000,
                  "max_position_embeddings": 2048},
    },
    # a toy for smoke tests: seconds per round
    "tiny": {
        "clip": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        "llama": {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
                  "max_position_embeddings": 1024},
    },
}
N_SPECIALS = 6  # word_tokenizer's <s> </s> <pad> <unk> <|im_start|> <|im_end|>


def word_list(folder: Path, vocab_size: int) -> Path:
    """A word file giving `word_tokenizer` exactly `vocab_size` entries (specials included)."""
    if vocab_size <= N_SPECIALS:
        raise ValueError(f"vocab_size must exceed the {N_SPECIALS} special tokens, got {vocab_size}")
    path = folder / "words.txt"
    path.write_text("\n".join(f"w{i}" for i in range(vocab_size - N_SPECIALS)) + "\n")
    return path


def spec_for(size: str, words: Path, attention: str = "auto", weight_layout: str = "auto") -> dict[str, Any]:
    """The mmhub spec of the benchmarked model (fp32); `attention` and `weight_layout` as in `mmhub.spec.Spec`."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    cfg = SIZES[size]
    return {"name": f"bench-llava-{size}",
            "encoders": {"image": {"type": "hf_vision", "config": cfg["clip"], "drop_cls": True, "select_layer": -1}},
            "projectors": {"image": {"type": "mlp", "depth": 2, "activation": "gelu"}},
            "backbone": {"type": "hf_causal_lm", "config": cfg["llama"], "tokenizer": f"words:{words}"},
            "template": "chatml", "attention": attention, "weight_layout": weight_layout}


@dataclass
class Pair:
    """The two models over the same weights, and what the data generators need."""

    mmhub: MMModel
    hf: Any
    export_dir: Path
    image_tokens: int  # LLM tokens per image
    image_size: int
    text_vocab: int  # ids drawn for text tokens: [N_SPECIALS, text_vocab)


def build_pair(size: str, workdir: Path, seed: int = 0) -> Pair:
    """Build the mmhub model, export it to `workdir`/hf-llava and load it back with transformers."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    words = word_list(workdir, SIZES[size]["llama"]["vocab_size"])
    model = build(spec_for(size, words))
    model.save_pretrained(workdir / "mmhub")  # the memory child processes load this copy
    out = export_hf_llava(model, workdir / "hf-llava")
    hf = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32)
    hf.config.use_cache = True
    return Pair(model, hf, out, model.plan.tokens_per_item("image"), SIZES[size]["clip"]["image_size"],
                SIZES[size]["llama"]["vocab_size"])


def load_side(side: str, workdir: Path, variant: str | None = None) -> Any:
    """One side alone, loaded from the folders `build_pair` wrote (for the peak-memory child processes). A `variant`
    (benchmarks.scaling's memory variants) loads mmhub from that variant's folder (its spec's runtime options) and
    turns on transformers' gradient checkpointing (non-reentrant) for ``transformers_ckpt``."""
    if side == "mmhub":  # its word list lies beside it
        return MMModel.from_pretrained(workdir / (variant or "mmhub"), allow_paths=[workdir])
    if side == "transformers":
        from transformers import LlavaForConditionalGeneration

        hf = LlavaForConditionalGeneration.from_pretrained(str(workdir / "hf-llava"), dtype=torch.float32)
        if variant == "transformers_ckpt":
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return hf
    raise ValueError(f"unknown side {side!r}; choose mmhub or transformers")


def samples(model: MMModel, n: int, lo: int, hi: int, image_size: int, text_vocab: int, rng: np.random.Generator,
            prompt_fraction: float = 0.25, labelled: bool = True) -> list[Encoded]:
    """`n` samples of `lo`..`hi` text tokens (uniform) with one image placeholder after the first token.

    With `labelled`, the first `prompt_fraction` of the text is prompt (label -100) and the rest is target."""
    pid = model.processor.placeholder_ids["image"]
    out = []
    for _ in range(n):
        length = int(rng.integers(lo, hi + 1))
        ids = rng.integers(N_SPECIALS, text_vocab, length).tolist()
        ids[0] = model.tokenizer.bos_token_id
        cut = max(2, int(length * prompt_fraction))
        labels = ([IGNORE] * cut + ids[cut:]) if labelled else [IGNORE] * length
        ids.insert(1, pid)
        labels.insert(1, IGNORE)
        pixels = rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)
        out.append(Encoded(ids, labels, {"image": [model.processor.preprocess["image"](pixels)]}))
    return out


def hf_batch(pair: Pair, batch: list[Encoded], padding_side: str = "right") -> dict[str, torch.Tensor]:
    """The same samples as transformers' LLaVA takes them (`llava_inputs` with the pair's ids and token count)."""
    return llava_inputs(pair.mmhub.processor, int(pair.hf.config.image_token_index), pair.image_tokens, batch,
                        padding_side)


def llava_inputs(processor: Any, image_token_index: int, image_tokens: int, batch: list[Encoded],
                 padding_side: str = "right") -> dict[str, torch.Tensor]:
    """mmhub samples as transformers' LLaVA takes them: each placeholder repeated once per image token
    (`image_token_index`), padded on `padding_side`, labels -100 on padding and image tokens, every sample's
    images stacked in order."""
    pid = processor.placeholder_ids["image"]
    rows, lab = [], []
    for s in batch:
        ids, labels = [], []
        for t, y in zip(s.input_ids, s.labels, strict=True):
            ids += [image_token_index] * image_tokens if t == pid else [t]
            labels += [IGNORE] * image_tokens if t == pid else [y]
        rows.append(ids)
        lab.append(labels)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), processor.pad_id)
    labels_t = torch.full((len(rows), width), IGNORE)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labels) in enumerate(zip(rows, lab, strict=True)):
        sl = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[i, sl], labels_t[i, sl], mask[i, sl] = torch.tensor(ids), torch.tensor(labels), 1
    pixels = torch.stack([p for s in batch for p in s.media["image"]])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels_t, "pixel_values": pixels}
