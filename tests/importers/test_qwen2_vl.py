"""Qwen2-VL in mmhub: the dynamic-resolution tower (``qwen2_vl_vision``) + ``patch_merger`` against transformers'
visual model, M-RoPE positions against transformers' ``get_rope_index``, and the ``qwen2_vl`` importer's logits and
greedy generation against ``Qwen2VLForConditionalGeneration`` (and Qwen2.5-VL's) through the family's own processor,
export back to transformers, part swaps that train."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mmhub.encoders.qwen2_vl_vision import CLIP_MEAN, CLIP_STD, Qwen2VLVisionEncoder, patchify
from mmhub.interfaces import BuildContext
from mmhub.media import load_image
from mmhub.projectors.patch_merger import PatchMergerProjector

VISION = {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "hidden_size": 48, "patch_size": 14,
          "spatial_merge_size": 2, "temporal_patch_size": 2}
# Qwen2.5-VL's tower: RMSNorm, SwiGLU, window attention (56 px windows: 2x2 merge units) except in block 1
VISION_25 = {"model_type": "qwen2_5_vl_vision", "depth": 2, "hidden_size": 32, "intermediate_size": 64,
             "num_heads": 2, "out_hidden_size": 48, "window_size": 56, "fullatt_block_indexes": [1],
             "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
VISIONS = {"qwen2_vl": VISION, "qwen2_5_vl": VISION_25}
FAMILIES = list(VISIONS)
PIXELS = {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 12}
FEATURE_TOL = 1e-5
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_measured() -> Any:
    """After this module's tests: what they measured (seen with pytest -s)."""
    yield
    if MEASURED:
        print("\nqwen2_vl measured:", {k: f"{v:.2e}" for k, v in MEASURED.items()})


def picture(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def perturb(module: torch.nn.Module, std: float, seed: int = 0) -> None:
    """Move every weight away from its initialisation, so that equal outputs mean equal maths."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0, std)
            if "norm" in name and name.endswith("weight"):  # norm scales around 1, not 0: the signal keeps its size
                p.add_(1.0)


def hf_visual(family: str = "qwen2_vl") -> Any:
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    settings = {k: v for k, v in VISIONS[family].items() if k != "model_type"}
    if family == "qwen2_vl":
        model = Qwen2VisionTransformerPretrainedModel._from_config(Qwen2VLVisionConfig(**settings))
    else:
        model = Qwen2_5_VisionTransformerPretrainedModel._from_config(Qwen2_5_VLVisionConfig(**settings))
    perturb(model.eval(), 0.2)
    return model


def mmhub_parts(visual: Any, family: str = "qwen2_vl") -> tuple[Qwen2VLVisionEncoder, PatchMergerProjector]:
    """mmhub's encoder and projector holding `visual`'s weights (its merger in the projector)."""
    ctx = BuildContext(resolve=lambda uri: uri)
    settings = {"config": VISIONS[family], **PIXELS}
    enc = Qwen2VLVisionEncoder(Qwen2VLVisionEncoder.Config.model_validate(settings), ctx).eval()
    norm = "layernorm" if family == "qwen2_vl" else "rmsnorm"
    proj_cfg = PatchMergerProjector.Config.model_validate({"in_dim": 32, "out_dim": 48, "merge": 2, "norm": norm})
    proj = PatchMergerProjector(proj_cfg, ctx).eval()
    state = visual.state_dict()
    enc.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("merger.")}, strict=True)
    proj.load_state_dict({k[len("merger."):]: v for k, v in state.items() if k.startswith("merger.")}, strict=True)
    return enc, proj


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_tower_and_merger_equal_transformers_visual_model(backend: str, family: str) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    visual = hf_visual(family)
    enc, proj = mmhub_parts(visual, family)
    # multiples of 28 need no resampling (any backend); other sizes are resized (PIL's bicubic, as mmhub does)
    sizes = [(56, 84), (28, 56)] if backend == "torchvision" else [(50, 70), (90, 33)]
    images = [picture(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    kind = Qwen2VLImageProcessor if backend == "torchvision" else Qwen2VLImageProcessorPil
    inputs = kind(min_pixels=PIXELS["min_pixels"], max_pixels=PIXELS["max_pixels"])(images=images, return_tensors="pt")
    items = [enc.preprocess(im, "image") for im in images]
    grids = torch.tensor([enc.token_grid(x) for x in items])
    assert torch.equal(grids, inputs["image_grid_thw"]), (grids, inputs["image_grid_thw"])
    ours_patches = torch.cat([patchify(x, 14, 2, 2) for x in items])
    pixel_diff = float((ours_patches - inputs["pixel_values"]).abs().max())
    assert pixel_diff < 1e-6, f"{backend}: pixel values differ by {pixel_diff}"
    with torch.no_grad():
        theirs = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        feats = enc(items, "image")
        assert isinstance(feats, list) and [f.shape[0] for f in feats] == grids.prod(-1).tolist()
        ours = torch.cat([proj(f[None])[0] for f in feats])
    diff = float((ours - theirs).abs().max())
    MEASURED[f"{family}-tower+merger-{backend}"] = diff
    assert ours.shape == theirs.shape and diff <= FEATURE_TOL, f"{backend}: merged features differ by {diff}"


def test_same_sized_images_come_back_stacked() -> None:
    enc, proj = mmhub_parts(hf_visual())
    items = torch.stack([enc.preprocess(picture(56, 56, seed=i), "image") for i in range(2)])
    with torch.no_grad():
        feats = enc(items, "image")
        assert feats.shape == (2, 16, 32)
        assert proj(feats).shape == (2, 4, 48)
    assert proj.grid_out(enc.token_grid(items[0])) == (1, 2, 2)


# --- M-RoPE positions -------------------------------------------------------------------------------------------

def test_mrope_positions_equal_get_rope_index_with_images_in_the_middle() -> None:
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    from mmhub.backbones.mrope import mrope_position_ids

    cfg = Qwen2VLConfig(vision_config=VISION, text_config=text_config(), image_token_id=IMAGE_ID)
    hf = Qwen2VLModel(cfg)
    # row 0: text, a 2x3 image, text, a 1x2 image, text; row 1 (left padded): text, a 3x2 image, text
    grids = [(1, 4, 6), (1, 2, 4), (1, 6, 4)]  # patch grids (the merger halves h and w)
    rows = [[5, 6] + [IMAGE_ID] * 6 + [7, 8, 9] + [IMAGE_ID] * 2 + [10], [0] * 5 + [5] + [IMAGE_ID] * 6 + [7, 8]]
    ids = torch.tensor(rows)
    mask = torch.tensor([[1] * 14, [0] * 5 + [1] * 9])
    types = (ids == IMAGE_ID).int()
    theirs, _ = hf.get_rope_index(ids, types, image_grid_thw=torch.tensor(grids), attention_mask=mask)
    spans = [(0, 2, (1, 2, 3)), (0, 11, (1, 1, 2)), (1, 6, (1, 3, 2))]
    ours = mrope_position_ids(mask, spans)
    real = mask.bool()
    assert torch.equal(ours[:, real], theirs[:, real]), (ours, theirs)


# --- the importer ------------------------------------------------------------------------------------------------

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# the byte tokenizer already has <|im_start|> 259 and <|im_end|> 260; the vision tokens follow
IDS = {"<|im_start|>": 259, "<|im_end|>": 260, "<|vision_start|>": 261, "<|vision_end|>": 262, "<|image_pad|>": 263,
       "<|video_pad|>": 264}
IMAGE_ID = IDS["<|image_pad|>"]
LOGIT_TOL = 1e-4
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def text_config(tied: bool = False) -> dict[str, Any]:
    return {"vocab_size": 300, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]},
            "bos_token_id": IDS["<|im_start|>"], "eos_token_id": IDS["<|im_end|>"],
            "pad_token_id": 0, "tie_word_embeddings": tied}


def tokenizer() -> Any:
    from mmhub.backbones.byte_tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_special_tokens({"extra_special_tokens": SPECIAL}, replace_extra_special_tokens=False)
    assert {t: tok.convert_tokens_to_ids(t) for t in SPECIAL} == IDS
    return tok


def hf_classes(family: str) -> tuple[Any, Any, Any]:
    """transformers' (config, model, processor) classes of `family`."""
    import transformers

    if family == "qwen2_vl":
        return transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLProcessor
    return (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration,
            transformers.Qwen2_5_VLProcessor)


def qwen2_vl_folder(folder: Any, tied: bool = False, legacy_keys: bool = False, family: str = "qwen2_vl") -> Any:
    """A tiny random Qwen2-VL (or Qwen2.5-VL) written by transformers itself, with its processor (image processor +
    tokenizer + Qwen2-VL's chat template); `legacy_keys` rewrites the tensors in the published checkpoints' layout."""
    from safetensors.torch import load_file, save_file
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    config_cls, model_cls, processor_cls = hf_classes(family)
    tok = tokenizer()
    vision = {k: v for k, v in VISIONS[family].items() if k != "model_type"}
    config = config_cls(vision_config=vision, text_config=text_config(tied), image_token_id=IMAGE_ID,
                        video_token_id=IDS["<|video_pad|>"], vision_start_token_id=IDS["<|vision_start|>"],
                        vision_end_token_id=IDS["<|vision_end|>"], tie_word_embeddings=tied)
    model = model_cls(config)
    perturb(model, 0.3)
    model.save_pretrained(str(folder))
    processor_cls(image_processor=Qwen2VLImageProcessor(**PIXELS), tokenizer=tok,
                  video_processor=Qwen2VLVideoProcessor(size={"shortest_edge": PIXELS["min_pixels"],
                                                              "longest_edge": PIXELS["max_pixels"]}),
                  chat_template=CHAT_TEMPLATE).save_pretrained(str(folder))
    if legacy_keys:  # as Qwen/Qwen2-VL-2B-Instruct is published: its key names, config.json, preprocessor_config
        state = load_file(str(folder / "model.safetensors"))
        rename = {"model.visual.": "visual.", "model.language_model.": "model."}
        state = {next((n + k[len(o):] for o, n in rename.items() if k.startswith(o)), k): v for k, v in state.items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        text = text_config(tied)
        rope = text.pop("rope_parameters")
        published = {"architectures": [model_cls.__name__], "model_type": family, **text,
                     "rope_theta": rope["rope_theta"], "rope_scaling": {"type": "mrope",
                                                                        "mrope_section": rope["mrope_section"]},
                     "image_token_id": IMAGE_ID, "video_token_id": IDS["<|video_pad|>"],
                     "vision_start_token_id": IDS["<|vision_start|>"], "vision_end_token_id": IDS["<|vision_end|>"],
                     "vision_config": {**vision, "in_chans": 3, "spatial_patch_size": 14},
                     "torch_dtype": "float32", "transformers_version": "4.45.0"}
        (folder / "config.json").write_text(json.dumps(published))
        (folder / "preprocessor_config.json").write_text(json.dumps({
            **PIXELS, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD), "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": processor_cls.__name__}))
    return folder


@pytest.fixture(scope="module", params=FAMILIES)
def imported(request, tmp_path_factory) -> tuple[Any, Any, Any]:
    """(mmhub model imported from the folder, transformers' model, transformers' processor), per family."""
    from transformers import AutoProcessor

    from mmhub.importers.run import import_checkpoint

    folder = qwen2_vl_folder(tmp_path_factory.mktemp(request.param), family=request.param)
    model = import_checkpoint(folder).eval()
    hf = hf_classes(request.param)[1].from_pretrained(str(folder)).eval()
    return model, hf, AutoProcessor.from_pretrained(str(folder))


def listed(content: str) -> list[dict[str, str]]:
    """mmhub's prompt text (placeholders inline) as transformers' list content."""
    parts: list[dict[str, str]] = []
    for piece in re.split(r"(<\|image_pad\|>|<\|video_pad\|>)", content):
        if piece in ("<|image_pad|>", "<|video_pad|>"):
            parts.append({"type": "image" if piece == "<|image_pad|>" else "video"})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


CONVERSATIONS = [
    [{"role": "user", "content": "<|image_pad|>What is this?"}, {"role": "assistant", "content": "A cat."}],
    [{"role": "user", "content": "Compare <|image_pad|> with <|image_pad|>, please."},
     {"role": "assistant", "content": "The first is wider."}],
]
IMAGES = [[picture(56, 84, seed=1)], [picture(84, 56, seed=2), picture(28, 56, seed=3)]]


def collapsed(ids: torch.Tensor) -> list[int]:
    """Token ids with every run of image pads (one image's tokens) as one pad: mmhub's placeholder form."""
    out: list[int] = []
    for t in ids.tolist():
        if not (t == IMAGE_ID and out and out[-1] == IMAGE_ID):
            out.append(t)
    return out


def hf_messages(conversation: list[dict[str, str]]) -> list[dict[str, Any]]:
    return [{"role": m["role"], "content": listed(m["content"]) if m["role"] == "user" else
             [{"type": "text", "text": m["content"]}]} for m in conversation]


def test_imported_logits_equal_transformers_through_its_processor(imported) -> None:
    model, hf, processor = imported
    assert [type(model.encoders["image"]).name, type(model.projectors["image"]).name] == ["qwen2_vl_vision",
                                                                                          "patch_merger"]
    texts = [processor.apply_chat_template(hf_messages(c), tokenize=False) for c in CONVERSATIONS]
    inputs = processor(images=[im for ims in IMAGES for im in ims], text=texts, padding=True, return_tensors="pt")
    batch = model.batch(CONVERSATIONS, [{"image": ims} for ims in IMAGES])
    with torch.no_grad():
        theirs = hf(**inputs).logits
        out = model(**batch)
    ours = out.logits
    diffs = []
    for row in range(len(CONVERSATIONS)):
        real = inputs["attention_mask"][row].bool()
        n = int(real.sum())
        assert int(out.labels[row].ne(-100).sum()) > 0
        # the same tokens: the processor's ids with each image's run of pads as mmhub's one placeholder
        assert collapsed(inputs["input_ids"][row][real]) == batch["input_ids"][row][batch["attention_mask"][row].bool()
                                                                                  ].tolist()
        diffs.append(float((ours[row, :n] - theirs[row][real]).abs().max()))
    diff = max(diffs)
    MEASURED[f"{hf.config.model_type}-logits"] = diff
    assert diff <= LOGIT_TOL, f"logits differ by {diffs} (tolerance {LOGIT_TOL})"


@pytest.mark.parametrize("case", [0, 1, 2])
def test_greedy_generation_equals_transformers(case: int, imported) -> None:
    """Case 0: an image then text; 1: two images of different sizes inside the text; 2: text only."""
    model, hf, processor = imported
    prompt = CONVERSATIONS[case][0]["content"] if case < 2 else "Tell me a story about the sea."
    images = IMAGES[case] if case < 2 else []
    text = processor.apply_chat_template([{"role": "user", "content": listed(prompt)}], add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(images=images or None, text=[text], return_tensors="pt")
    ours = model.batch([prompt], [{"image": images}], add_generation_prompt=True, padding_side="left")
    assert collapsed(inputs["input_ids"][0]) == ours["input_ids"][0].tolist()  # the same prompt tokens
    stops = model.stop_token_ids()
    with torch.no_grad():
        gen = hf.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=stops,
                          suppress_tokens=[IMAGE_ID], pad_token_id=0)
    theirs = gen[0, inputs["input_ids"].shape[1]:].tolist()
    theirs = theirs[:next((i for i, t in enumerate(theirs) if t in stops), len(theirs))]
    want = model.generate_ids(ours["input_ids"], ours["attention_mask"], ours["media"], max_new_tokens=16)[0]
    MEASURED[f"{hf.config.model_type}-greedy-{case}-tokens-equal"] = float(len(want))
    assert want == theirs, (want, theirs)
    assert len(want) == 16, f"only {len(want)} tokens before a stop token; pick another prompt or seed"


VIDEO = [picture(56, 84, seed=10 + i) for i in range(8)]  # 8 frames at a size no processor resamples
VIDEO_CONVERSATION = [{"role": "user", "content": "Watch <|video_pad|> then look at <|image_pad|>. What changed?"},
                      {"role": "assistant", "content": "The colours."}]


def test_video_logits_and_greedy_generation_equal_transformers(imported) -> None:
    """Qwen2-VL's videos: 8 frames -> 4 temporal patches through the shared tower, M-RoPE with a time axis, beside
    an image in the same prompt: logits at every position and greedy tokens equal transformers'."""
    model, hf, processor = imported
    if hf.config.model_type != "qwen2_vl":
        assert "video" not in model.encoders  # Qwen2.5-VL imports images only
        return
    media = {"image": IMAGES[0], "video": [VIDEO]}
    text = processor.apply_chat_template(hf_messages(VIDEO_CONVERSATION), tokenize=False)
    inputs = processor(images=IMAGES[0], videos=[VIDEO], text=[text], return_tensors="pt")
    assert inputs["video_grid_thw"].tolist() == [[4, 4, 6]]
    batch = model.batch([VIDEO_CONVERSATION], [media])
    with torch.no_grad():
        theirs = hf(**inputs).logits[0]
        ours = model(**batch).logits[0]
    diff = float((ours - theirs).abs().max())
    MEASURED["qwen2_vl-video-logits"] = diff
    assert ours.shape == theirs.shape and diff <= LOGIT_TOL, f"video logits differ by {diff}"
    prompt = VIDEO_CONVERSATION[0]["content"]
    text = processor.apply_chat_template([{"role": "user", "content": listed(prompt)}], add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(images=IMAGES[0], videos=[VIDEO], text=[text], return_tensors="pt")
    ours_in = model.batch([prompt], [media], add_generation_prompt=True, padding_side="left")
    stops = model.stop_token_ids()
    with torch.no_grad():
        gen = hf.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=stops,
                          suppress_tokens=[IMAGE_ID, IDS["<|video_pad|>"]], pad_token_id=0)
    theirs_ids = gen[0, inputs["input_ids"].shape[1]:].tolist()
    theirs_ids = theirs_ids[:next((i for i, t in enumerate(theirs_ids) if t in stops), len(theirs_ids))]
    want = model.generate_ids(ours_in["input_ids"], ours_in["attention_mask"], ours_in["media"], max_new_tokens=16)[0]
    assert want == theirs_ids and len(want) == 16, (want, theirs_ids)


def test_video_frame_sampling_controls() -> None:
    """video_frames samples uniformly; video_fps takes frames at that rate along the timeline first (a {frames, fps}
    item states its own rate); the frame count rounds up to whole temporal patches; no video_frames, no video."""
    from mmhub.errors import MMHubError

    ctx = BuildContext(resolve=lambda uri: uri)

    def encoder(**video: Any) -> Qwen2VLVisionEncoder:
        return Qwen2VLVisionEncoder(Qwen2VLVisionEncoder.Config.model_validate(
            {"config": VISION, **PIXELS, "video_min_pixels": 784, "video_max_pixels": 28 * 28 * 12, **video}), ctx)

    clip = [picture(28, 56, seed=i) for i in range(12)]
    out = encoder(video_frames=3).preprocess(clip, "video")
    assert out.shape == (4, 3, 28, 56) and torch.equal(out[3], out[2])  # 3 frames, the last repeated
    picked = encoder(video_frames=4).preprocess(clip, "video")
    assert torch.equal(picked[0], encoder(video_frames=1).preprocess(clip[1:2], "video")[0])  # centres of 4 segments
    slow = encoder(video_frames=2, video_fps=1.0).preprocess({"frames": clip, "fps": 4.0}, "video")
    fast = encoder(video_frames=2).preprocess(clip, "video")
    assert not torch.equal(slow, fast)  # 1 frame/s of a 4 frames/s clip: 3 frames, then 2 of them
    with pytest.raises(MMHubError, match="video_frames"):
        encoder().preprocess(clip, "video")


def test_the_budget_counts_the_largest_image(imported) -> None:
    """Before anything runs, the plan counts an image at the most tokens any image can take (the pixel budget in
    28x28 merge blocks, or more: a very oblong image keeps one block across); large and oblong images stay within."""
    from mmhub.encoders.qwen2_vl_vision import most_blocks

    model = imported[0]
    most = model.plan.tokens_per_item("image")
    assert most == most_blocks(PIXELS["min_pixels"], PIXELS["max_pixels"], 28) >= PIXELS["max_pixels"] // (28 * 28)
    enc, proj = model.encoders["image"], model.projectors["image"]
    for h, w in ((400, 300), (28, 280), (1000, 60), (5600, 28), (29, 28 * 199)):
        t, gh, gw = proj.grid_out(enc.token_grid(enc.preprocess(picture(h, w, seed=0), "image"), "image"))
        assert t * gh * gw <= most, (h, w, gh, gw)


def test_left_padded_batch_generates_what_each_prompt_does(imported) -> None:
    """Two prompts of different lengths and image sizes in one left-padded batch: each row's M-RoPE positions (and
    their continuation while decoding) stay its own, so each row generates what transformers does for it alone."""
    model, hf, processor = imported
    prompts = [c[0]["content"] for c in CONVERSATIONS]
    stops = model.stop_token_ids()
    alone = []
    for prompt, images in zip(prompts, IMAGES, strict=True):
        text = processor.apply_chat_template([{"role": "user", "content": listed(prompt)}],
                                             add_generation_prompt=True, tokenize=False)
        inputs = processor(images=images, text=[text], return_tensors="pt")
        with torch.no_grad():
            gen = hf.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=stops,
                              suppress_tokens=[IMAGE_ID], pad_token_id=0)[0, inputs["input_ids"].shape[1]:].tolist()
        alone.append(gen[:next((i for i, t in enumerate(gen) if t in stops), len(gen))])
    batch = model.batch(prompts, [{"image": ims} for ims in IMAGES], add_generation_prompt=True, padding_side="left")
    assert int(batch["attention_mask"].sum(1).min()) < batch["input_ids"].shape[1]  # one row is padded
    together = model.generate_ids(batch["input_ids"], batch["attention_mask"], batch["media"], max_new_tokens=16)
    assert together == alone, (together, alone)


def test_published_key_layout_and_tied_head(tmp_path) -> None:
    """A folder as the published checkpoints are (visual., model., lm_head. keys; transformers 4's config.json with
    the text settings at the top and rope_scaling mrope; preprocessor_config.json with min/max_pixels) with a tied
    head imports to the same logits as transformers' model from the current layout (same weights)."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from mmhub.importers.run import import_checkpoint

    model = import_checkpoint(qwen2_vl_folder(tmp_path / "legacy", tied=True, legacy_keys=True))
    reference = qwen2_vl_folder(tmp_path / "current", tied=True)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(str(reference)).eval()
    processor = AutoProcessor.from_pretrained(str(reference))
    text = processor.apply_chat_template(hf_messages(CONVERSATIONS[1]), tokenize=False)
    inputs = processor(images=IMAGES[1], text=[text], return_tensors="pt")
    with torch.no_grad():
        theirs = hf(**inputs).logits[0]
        ours = model(**model.batch(CONVERSATIONS[1:], [{"image": IMAGES[1]}])).logits[0]
    diff = float((ours - theirs).abs().max())
    MEASURED["logits-published-layout-tied"] = diff
    assert ours.shape == theirs.shape and diff <= LOGIT_TOL, f"logits differ by {diff}"


def test_saved_import_reloads_with_the_same_outputs(imported, tmp_path) -> None:
    """save_pretrained writes every weight (the spec has no source:) and the tokenizer into the folder's tokenizer/,
    so the folder loads by itself, moved elsewhere, with nothing allowed outside it; the tokenizer files are hashed
    in the manifest like the weights."""
    import json
    import shutil

    import mmhub

    model = imported[0]
    out = model.save_pretrained(tmp_path / "saved")
    spec = json.loads((out / "mmhub_spec.json").read_text())
    assert spec["backbone"]["tokenizer"] == "tokenizer" and (out / "tokenizer" / "tokenizer_config.json").is_file()
    manifest = json.loads((out / "mmhub_manifest.json").read_text())
    assert any(name.startswith("tokenizer/") for name in manifest["files"])
    moved = Path(shutil.move(str(out), str(tmp_path / "elsewhere")))
    again = mmhub.load(str(moved)).eval()
    batch = model.batch(CONVERSATIONS, [{"image": ims} for ims in IMAGES])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)
    assert again.backbone.tokenizer("a b c")["input_ids"] == model.backbone.tokenizer("a b c")["input_ids"]


def test_export_reloads_in_transformers_with_identical_logits(imported, tmp_path) -> None:
    """import -> export -> transformers' model class + AutoProcessor from the exported folder:
    the same inputs and logits as the original checkpoint's."""
    from transformers import AutoProcessor

    from mmhub.importers.qwen2_vl import Qwen2VLImporter

    model, hf, processor = imported
    out = Qwen2VLImporter().export(model, tmp_path / "exported")
    back = type(hf).from_pretrained(str(out)).eval()
    back_processor = AutoProcessor.from_pretrained(str(out))
    texts = [processor.apply_chat_template(hf_messages(c), tokenize=False) for c in CONVERSATIONS]
    images = [im for ims in IMAGES for im in ims]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    again = back_processor(images=images, text=[back_processor.apply_chat_template(hf_messages(c), tokenize=False)
                                               for c in CONVERSATIONS], padding=True, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], again["input_ids"]) and torch.equal(inputs["image_grid_thw"],
                                                                              again["image_grid_thw"])
    assert float((inputs["pixel_values"] - again["pixel_values"]).abs().max()) < 1e-6
    with torch.no_grad():
        diff = float((hf(**inputs).logits - back(**again).logits).abs().max())
    MEASURED[f"{hf.config.model_type}-export-reload-logits"] = diff
    if "video" in model.encoders:  # the exported video processor reads videos as the original does
        text = processor.apply_chat_template(hf_messages(VIDEO_CONVERSATION), tokenize=False)
        one, two = (p(images=IMAGES[0], videos=[VIDEO], text=[text], return_tensors="pt")
                    for p in (processor, back_processor))
        assert torch.equal(one["input_ids"], two["input_ids"])
        assert torch.equal(one["video_grid_thw"], two["video_grid_thw"])
        assert float((one["pixel_values_videos"] - two["pixel_values_videos"]).abs().max()) < 1e-6
    assert diff <= 1e-5, f"exported model's logits differ by {diff}"


def test_cli_import_then_export_of_the_saved_folder(tmp_path, capsys) -> None:
    """`mmhub import FOLDER OUT` then `mmhub export OUT BACK --format hf`: the saved folder remembers the family it
    was imported from, so the export writes a Qwen2-VL folder transformers loads with the original's logits."""
    from transformers import AutoProcessor

    from mmhub.cli import main

    folder = qwen2_vl_folder(tmp_path / "ckpt")
    assert main(["import", str(folder), str(tmp_path / "mm")]) == 0
    assert main(["export", str(tmp_path / "mm"), str(tmp_path / "back"), "--format", "hf"]) == 0
    assert "transformers qwen2_vl folder" in capsys.readouterr().out
    config_cls, model_cls, _ = hf_classes("qwen2_vl")
    original, back = (model_cls.from_pretrained(str(f)).eval() for f in (folder, tmp_path / "back"))
    processor = AutoProcessor.from_pretrained(str(folder))
    text = processor.apply_chat_template(hf_messages(CONVERSATIONS[1]), tokenize=False)
    inputs = processor(images=IMAGES[1], text=[text], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(original(**inputs).logits, back(**inputs).logits)


def test_packed_rows_are_refused_with_grid_positions(imported) -> None:
    """M-RoPE positions do not restart per packed sample: packed rows are refused by name, not mispositioned."""
    from mmhub.errors import MMHubError
    from mmhub.packing import collate_packed

    model = imported[0]
    samples = [model.processor.encode(c, {"image": ims}) for c, ims in zip(CONVERSATIONS, IMAGES, strict=True)]
    batch = collate_packed(model.processor, samples, [[0, 1]])
    with pytest.raises(MMHubError, match="M-RoPE"):
        model(**batch)


def test_transformers_generate_fallback_is_refused_with_images(imported) -> None:
    """transformers' generate would give the media tokens text positions: settings that need it are refused."""
    from mmhub.errors import MMHubError

    model = imported[0]
    ours = model.batch([CONVERSATIONS[0][0]["content"]], [{"image": IMAGES[0]}], add_generation_prompt=True,
                       padding_side="left")
    with pytest.raises(MMHubError, match="M-RoPE"):
        model.generate_ids(ours["input_ids"], ours["attention_mask"], ours["media"], max_new_tokens=4, num_beams=2)


CLIP = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
LLAMA = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 512}


@pytest.mark.parametrize("swap", ["llm", "tower"])
def test_swap_a_part_and_train_a_step(swap: str, imported, tmp_path) -> None:
    """The imported model is ordinary mmhub parts. ``llm``: its M-RoPE Qwen2 swapped for a tiny Llama (the dynamic-
    resolution tower and merger kept with their imported weights, two image sizes in one batch); ``tower``: a CLIP
    tower + mlp in front of the imported M-RoPE LM (its tokens, without a grid, take one row of positions). Each
    trains one step; the result is no longer a Qwen2-VL, and export says which part."""
    from mmhub import build

    model0 = imported[0]
    spec = model0.spec.model_dump(exclude_none=True)
    if swap == "llm":
        spec["backbone"] = {"type": "hf_causal_lm", "tokenizer": "byte", "config": LLAMA}
        spec["template"] = "chatml"
    else:  # CLIP reads images only: the video slot goes
        spec["encoders"] = {"image": {"type": "hf_vision", "config": CLIP}}
        spec["projectors"] = {"image": {"type": "mlp", "depth": 2}}
        spec["placeholders"] = {"image": spec["placeholders"]["image"]}
    model = build(spec)
    kept = model.encoders if swap == "llm" else model.backbone
    kept.load_state_dict((model0.encoders if swap == "llm" else model0.backbone).state_dict())
    assert model.backbone.grid_positions == (swap == "tower")
    batch = model.batch(CONVERSATIONS, [{"image": ims} for ims in IMAGES])
    model.train()
    trained = list(model.projectors.parameters()) + list(model.backbone.parameters())
    for p in trained:
        p.requires_grad_(True)
    before = [p.detach().clone() for p in model.projectors.parameters()]
    optimizer = torch.optim.SGD(trained, lr=0.1)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not all(torch.equal(b, p) for b, p in zip(before, model.projectors.parameters(), strict=True))
    from mmhub.errors import ExportError
    from mmhub.importers.qwen2_vl import Qwen2VLImporter

    blocking = "backbone (hf_causal_lm, model_type llama)" if swap == "llm" else "encoders image (hf_vision)"
    with pytest.raises(ExportError, match=re.escape(blocking)):
        Qwen2VLImporter().export(model, tmp_path / "refused")


@pytest.mark.parametrize(("frames", "clip_fps", "fps", "most"), [
    (12, 4.0, 1.0, 8),  # 3 s at 1 frame/s: 3 frames, floored to 2
    (12, 4.0, 2.0, 8),  # 6 frames
    (40, 4.0, 2.0, 8),  # 20 frames capped at 8
    (5, 10.0, 2.0, 8),  # 1 frame by rate, raised to min_frames 4
    (3, 1.0, 2.0, 8),  # more than the clip has: all 3, floored to 2
])
def test_video_max_frames_samples_as_qwen2_vl_video_processor(frames: int, clip_fps: float, fps: float,
                                                             most: int) -> None:
    """video_fps + video_max_frames take the frames transformers' Qwen2-VL video processor takes (its sample_frames
    with the clip's metadata): the count follows the clip's length, so a short clip costs fewer tokens, and the
    budget counts video_max_frames."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    ctx = BuildContext(resolve=lambda uri: uri)
    settings = {"config": VISION, **PIXELS, "video_min_pixels": 784, "video_max_pixels": 28 * 28 * 12,
                "video_fps": fps, "video_max_frames": most, "video_min_frames": 4}
    enc = Qwen2VLVisionEncoder(Qwen2VLVisionEncoder.Config.model_validate(settings), ctx)
    clip = [picture(28, 56, seed=i) for i in range(frames)]
    ours = enc.preprocess({"frames": clip, "fps": clip_fps}, "video")
    processor = Qwen2VLVideoProcessor(temporal_patch_size=2, min_frames=4, max_frames=most)
    meta = VideoMetadata(total_num_frames=frames, fps=clip_fps, duration=frames / clip_fps)
    picked = processor.sample_frames(meta, fps=fps).tolist()
    want = torch.stack([enc.picture(load_image(clip[i]).convert("RGB"), lambda h, w: (28, 56)) for i in picked])
    assert ours.shape == want.shape and torch.equal(ours, want), (ours.shape, picked)
    facts = Qwen2VLVisionEncoder.describe(enc.config, ctx)
    fixed = Qwen2VLVisionEncoder.describe(Qwen2VLVisionEncoder.Config.model_validate(
        {**{k: v for k, v in settings.items() if k not in ("video_fps", "video_max_frames")}, "video_frames": most}),
        ctx)
    assert facts.tokens_for("video") == fixed.tokens_for("video")  # the budget counts the cap


def test_video_max_frames_needs_video_fps() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="video_fps"):
        Qwen2VLVisionEncoder.Config.model_validate({"config": VISION, "video_max_frames": 8})
    with pytest.raises(ValidationError, match="video_min_frames 9 > video_max_frames 8"):
        Qwen2VLVisionEncoder.Config.model_validate({"config": VISION, "video_fps": 2.0, "video_max_frames": 8,
                                                    "video_min_frames": 9})
