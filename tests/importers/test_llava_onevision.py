"""LLaVA-OneVision import: a tiny random OneVision written by transformers (SigLIP tower, Qwen2 LM, its processor)
imports as anyres(hf_vision SigLIP, max_tiles) -> mlp (+ image_newline) -> Qwen2 and matches transformers through
LlavaOnevisionProcessor on images of different aspect ratios, one of them large enough for the anyres_max_N
downscale: the same token sequence, logits at every real position, greedy tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_llava_next import (
    CONVS,
    TILE,
    compare_logits,
    greedy_pairs,
    perturb,
    reference,
    tokenizer_with_image,
    vicuna_jinja,
)

from mmhub.encoders.anyres import grid_of
from mmhub.importers import import_checkpoint

TOL = 1e-4
PINPOINTS = [[TILE * r, TILE * c] for r in range(1, 4) for c in range(1, 4)]
MAX_TILES = 2  # anyres_max_2: an unpadded grid over 2.2 tiles' tokens is downscaled
SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "image_size": TILE, "patch_size": 8}
QWEN2 = {"model_type": "qwen2", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 512,
         "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258, "tie_word_embeddings": False}
FRAMES = 4  # per video: the video processor's num_frames, which the import reads
VIDEO_CONV = [{"role": "user", "content": "<video>\nWhat happens?"}, {"role": "assistant", "content": "A dance."}]
SHAPES = ((96, 70, 3), (30, 64, 3))  # tall (a 3x3 grid, downscaled) and wide (1x2, kept as is)


def onevision_folder(folder: Path, seed: int = 0) -> Path:
    """A LLaVA-OneVision folder written by transformers: shrunk config, weights moved off their init, its processor."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tok = tokenizer_with_image()
    tok.add_special_tokens({"extra_special_tokens": ["<video>"]}, replace_extra_special_tokens=False)
    tok.chat_template = vicuna_jinja(tok)
    config = LlavaOnevisionConfig(vision_config=SIGLIP, text_config=QWEN2,
                                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"),
                                  image_grid_pinpoints=PINPOINTS,
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  vision_aspect_ratio=f"anyres_max_{MAX_TILES}", projector_hidden_act="gelu",
                                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    hf = LlavaOnevisionForConditionalGeneration(config)
    perturb(hf, 0.2, seed)
    hf.save_pretrained(str(folder))
    image_processor = LlavaOnevisionImageProcessor(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
    video_processor = LlavaOnevisionVideoProcessor(size={"height": TILE, "width": TILE}, num_frames=FRAMES)
    LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                            num_image_tokens=(TILE // 8) ** 2,
                            vision_feature_select_strategy="full", vision_aspect_ratio=f"anyres_max_{MAX_TILES}",
                            chat_template=tok.chat_template).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return onevision_folder(tmp_path_factory.mktemp("llava_onevision") / "tiny")


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in SHAPES]


def test_imported_onevision_logits_equal_transformers(folder: Path, pictures) -> None:
    model = import_checkpoint(folder)
    assert model.imported_from["importer"] == "llava_onevision"
    enc = model.encoders["image"]
    assert model.spec.encoders["image"].type == "anyres" and enc.config.max_tiles == MAX_TILES
    counts = [int(enc.token_mask(enc.preprocess(p, "image")[None], "image").sum()) for p in pictures]
    rows, cols = grid_of(SHAPES[0][:2], enc.config.grid_pinpoints, TILE)
    assert counts[0] < 16 + rows * cols * 16, "the first image must exercise the anyres_max downscale"
    assert counts[1] == 16 + 4 * (8 + 1), "the second image's 1x2 grid stays (4 rows of 8 tokens + newline)"
    hf, processor = reference(folder, "LlavaOnevisionForConditionalGeneration")
    diff = compare_logits(model, hf, processor, pictures, CONVS, extra=("image_sizes", "batch_num_images"))
    print(f"llava_onevision: image tokens {counts}, max abs logit diff {diff:.3g}")
    assert diff <= TOL, f"llava_onevision: max abs logit diff {diff:.3g} > {TOL} (image tokens {counts})"


def test_greedy_generation_equals_transformers(folder: Path, pictures) -> None:
    model = import_checkpoint(folder)
    hf, processor = reference(folder, "LlavaOnevisionForConditionalGeneration")
    for ours, theirs in greedy_pairs(model, hf, processor, pictures, QWEN2["eos_token_id"]):
        assert ours == theirs, f"greedy tokens differ: mmhub {ours} vs transformers {theirs}"
        assert len(ours) == 16 and len(set(ours)) > 1, f"degenerate generation {ours}: the test would not see much"


def test_export_reloads_in_transformers_with_identical_logits(folder: Path, pictures, clip, tmp_path) -> None:
    from mmhub.importers.run import find_importer

    model = import_checkpoint(folder)
    out = find_importer("llava_onevision", "test").export(model, tmp_path / "exported")
    hf, processor = reference(out, "LlavaOnevisionForConditionalGeneration")
    assert hf.config.vision_aspect_ratio == f"anyres_max_{MAX_TILES}"
    diff = compare_logits(model, hf, processor, pictures, CONVS, extra=("image_sizes", "batch_num_images"))
    video = video_logit_diff(model, hf, processor, clip)
    print(f"llava_onevision export: max abs logit diff {diff:.3g} (images), {video:.3g} (video)")
    assert diff <= TOL and video <= TOL, f"llava_onevision export: max abs logit diff {diff:.3g} / {video:.3g}"


@pytest.fixture(scope="module")
def clip() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(FRAMES)]


def video_logit_diff(model, hf, processor, frames: list[Image.Image]) -> float:
    """Max |mmhub - transformers| logit at every position of a video conversation, after checking the sequences."""
    text = processor.apply_chat_template(VIDEO_CONV, tokenize=False)
    theirs_in = processor(videos=[frames], text=[text], return_tensors="pt")
    batch = model.batch([VIDEO_CONV], [{"video": [frames]}])
    sp = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], media=batch["media"])
    ids = batch["input_ids"].gather(1, sp.origin.clamp(min=0))
    ids = ids.masked_fill(sp.media_positions, model.processor.placeholder_ids["video"])
    assert torch.equal(ids, theirs_in["input_ids"]), (
        f"video sequence differs: mmhub {ids.shape[1]} tokens vs processor {theirs_in['input_ids'].shape[1]}")
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = hf(**theirs_in).logits
    return float((ours - theirs).abs().max())


def test_imported_onevision_video_logits_equal_transformers(folder: Path, clip) -> None:
    """A video (4 frames, resized to the tile): the shared tower, each frame's grid pooled 2x after the projector,
    one image_newline at the end; then the video projector trained apart from the image one changes the logits."""
    model = import_checkpoint(folder)
    assert model.spec.encoders["video"] == "image" and model.encoders["video"] is model.encoders["image"]
    assert model.encoders["image"].config.video_frames == FRAMES
    hf, processor = reference(folder, "LlavaOnevisionForConditionalGeneration")
    diff = video_logit_diff(model, hf, processor, clip)
    print(f"llava_onevision video: {FRAMES} frames x 4 pooled tokens + newline, max abs logit diff {diff:.3g}")
    assert diff <= TOL, f"llava_onevision video: max abs logit diff {diff:.3g} > {TOL}"
    with torch.no_grad():
        model.projectors["video"].net[0].weight.mul_(1.5)
    assert video_logit_diff(model, hf, processor, clip) > 1e-2  # the video path goes through its own projector
