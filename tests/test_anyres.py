"""The ``anyres`` encoder (LLaVA-NeXT / OneVision tiling in front of any image tower) against transformers' own
functions: tile selection, pixels, unpadding and token counts on several image sizes, the post-projection layout
against LlavaNextModel/LlavaOnevisionModel.pack_image_features, and splicing items of different lengths."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mmhub.encoders.anyres import AnyResConfig, AnyResEncoder, best_resolution, item_tokens, most_tokens
from mmhub.interfaces import BuildContext
from mmhub.registry import get_registry
from mmhub.splice import splice
from mmhub.testing import EncoderTests

TILE = 32
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
TOWER = {"type": "hf_vision", "config": {"model_type": "clip_vision_model", "hidden_size": 32,
                                         "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                         "image_size": TILE, "patch_size": 8}, "select_layer": -2}
SIZES = [(40, 90), (90, 40), (64, 64), (33, 100), (100, 33), (20, 25)]  # (height, width)


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def encoder(**settings: object) -> AnyResEncoder:
    cfg = AnyResConfig.model_validate({"tower": TOWER, "grid_pinpoints": PINPOINTS, "tile_size": TILE, **settings})
    return AnyResEncoder(cfg, BuildContext(resolve=lambda uri: uri, registry=get_registry())).eval()


def hf_processor(**extra: object):  # noqa: ANN201
    from transformers import LlavaNextImageProcessor

    return LlavaNextImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                   image_grid_pinpoints=PINPOINTS, **extra)


def test_tile_choice_pixels_and_token_counts_equal_transformers() -> None:
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    enc, proc = encoder(), hf_processor()
    side = 4  # 32-pixel tiles, 8-pixel patches
    for k, (h, w) in enumerate(SIZES):
        assert best_resolution((h, w), [tuple(p) for p in PINPOINTS]) == tuple(select_best_resolution((h, w),
                                                                                                      PINPOINTS))
        img = picture(h, w, k)
        theirs = proc(images=[img], return_tensors="pt")
        n = image_size_to_num_patches((h, w), PINPOINTS, TILE)
        ours, size = enc.tiles(img)
        assert size == (h, w) and ours.shape[0] == n
        diff = (ours - theirs["pixel_values"][0, :n]).abs().max().item()
        assert diff == 0.0, f"{h}x{w}: pixels differ from LlavaNextImageProcessor's by {diff}"
        # the token count LlavaNextProcessor puts in the prompt (its CLS-free count: num_additional_image_tokens 0)
        from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

        count = LlavaNextProcessor._get_number_of_features(
            SimpleNamespace(image_processor=proc, patch_size=8, num_additional_image_tokens=0,
                            _get_unpadded_features=lambda *a: LlavaNextProcessor._get_unpadded_features(None, *a)),
            h, w, TILE, TILE)
        assert item_tokens((h, w), enc.config, side) == count
        assert int(enc.token_mask(enc.preprocess(img, "image")[None], "image").sum()) == count
    assert enc.width == max(most_tokens(enc.config, side), (1 + 4) * side * side)  # 64x64: 2x2 tiles
    assert all(item_tokens(s, enc.config, side) <= enc.width for s in [(1, 1000), (1000, 1), (500, 499), (7, 9)])


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_layout_after_projection_equals_pack_image_features(family: str) -> None:
    """arrange() on projected tile tokens = transformers' pack_image_features (unpad, OneVision downscale, newline)."""
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    onevision = family == "llava_onevision"
    pins = [[32 * r, 32 * c] for r in range(1, 5) for c in range(1, 5)] if onevision else PINPOINTS
    enc = encoder(grid_pinpoints=pins, max_tiles=2 if onevision else None)
    hidden = 24
    newline = torch.randn(hidden)
    projector = SimpleNamespace(image_newline=newline, name="mlp")
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=TILE, patch_size=8), image_grid_pinpoints=pins)
    sizes = [(40, 90), (90, 40), (130, 100), (33, 120)]
    items = [enc.preprocess(picture(h, w, k), "image") for k, (h, w) in enumerate(sizes)]  # different tile counts
    counts = [int(x[2]) for x in items]
    torch.manual_seed(0)
    tokens = torch.zeros(len(sizes), enc.width, hidden)
    for i, n in enumerate(counts):
        tokens[i, : n * 16] = torch.randn(n * 16, hidden)
    ours = enc.arrange(tokens, items, "image", projector)
    mask = enc.token_mask(items, "image")
    per_image = [tokens[i, : n * 16].view(n, 16, hidden) for i, n in enumerate(counts)]
    owner = SimpleNamespace(config=config)
    if onevision:
        theirs, lens = LlavaOnevisionModel.pack_image_features(owner, per_image, torch.tensor(sizes), newline,
                                                               vision_aspect_ratio="anyres_max_2")
    else:
        theirs, lens = LlavaNextModel.pack_image_features(owner, per_image, torch.tensor(sizes), "default", newline)
    assert mask.sum(1).tolist() == lens.tolist()
    for i, t in enumerate(theirs):
        got = ours[i, : int(lens[i])]
        assert torch.equal(got, t), f"image {sizes[i]}: layout differs by {(got - t).abs().max().item()}"
        assert not ours[i, int(lens[i]):].any()


def test_splice_takes_each_item_at_its_own_length() -> None:
    ids = torch.tensor([[5, 7, 6, 0], [7, 5, 7, 6]])  # 7 = placeholder
    text = torch.arange(8, dtype=torch.float32).view(2, 4, 1).expand(2, 4, 2).clone()
    feats = torch.stack([torch.full((3, 2), 10.0 + i) for i in range(3)])
    feats[:, :, 1] = torch.arange(3, dtype=torch.float32)  # token index inside the item
    masks = {7: torch.tensor([[True, True, False], [True, False, False], [True, True, True]])}
    sp = splice(ids, text, torch.ones(2, 4, dtype=torch.long), None, {7: feats}, masks=masks)
    assert sp.attention_mask.sum(1).tolist() == [3 + 2, 2 + 1 + 3]
    row0 = sp.inputs_embeds[0, :5, 0].tolist()
    assert row0 == [0.0, 10.0, 10.0, 2.0, 3.0]
    assert sp.inputs_embeds[1, :, 0].tolist() == [11.0, 5.0, 12.0, 12.0, 12.0, 7.0]
    assert sp.inputs_embeds[1, 2:5, 1].tolist() == [0.0, 1.0, 2.0]
    assert sp.media_positions.sum().item() == 2 + 1 + 3


def test_token_budget_counts_the_most_an_image_can_take() -> None:
    """Before anything runs: the budget check counts every image at AnyRes' worst case (a 64x64 image: 16 base
    tokens + 8 rows of 8 + a newline each = 88), not at one tile's 16."""
    from mmhub.errors import SpecError
    from mmhub.spec import load_spec
    from mmhub.validation import plan_spec

    llama = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 300, "max_position_embeddings": 256}
    spec = {"name": "anyres-budget",
            "encoders": {"image": {"type": "anyres", "tower": TOWER, "grid_pinpoints": PINPOINTS, "tile_size": TILE}},
            "projectors": {"image": {"type": "mlp", "newline": True}},
            "backbone": {"type": "hf_causal_lm", "config": llama, "tokenizer": "byte"},
            "template": "chatml", "max_items": {"image": 2}}
    plan = plan_spec(load_spec(spec))
    settings = {k: v for k, v in spec["encoders"]["image"].items() if k != "type"}
    assert plan.tokens_per_item("image") == 88 == item_tokens((64, 64), AnyResConfig.model_validate(settings), 4)
    with pytest.raises(SpecError, match=r"token budget \d+ \(image: 3 x 88"):
        plan_spec(load_spec({**spec, "max_items": {"image": 3}}))


def test_budget_counts_what_is_left_after_pooling() -> None:
    """With anyres_max_N and OneVision video pooling, forward emits more tokens than an item can occupy: the plan's
    tokens per item (the budget, packing) is the most an item really takes."""
    from mmhub.spec import load_spec
    from mmhub.validation import plan_spec

    llama = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 300, "max_position_embeddings": 1024}
    pins = [[TILE * r, TILE * c] for r in range(1, 5) for c in range(1, 5)]
    anyres = {"type": "anyres", "tower": TOWER, "grid_pinpoints": pins, "tile_size": TILE, "max_tiles": 2,
              "video_frames": 3}
    plan = plan_spec(load_spec({"name": "pooled", "encoders": {"image": anyres, "video": "image"},
                                "projectors": {"image": {"type": "mlp", "newline": True},
                                               "video": {"type": "mlp", "newline": True}},
                                "backbone": {"type": "hf_causal_lm", "config": llama, "tokenizer": "byte"},
                                "template": "chatml"}))
    cfg = AnyResConfig.model_validate({k: v for k, v in anyres.items() if k != "type"})
    assert plan.encoder_facts["image"].tokens_per_item == (1 + 16) * 16  # forward: every tile of a 4x4 grid
    assert plan.tokens_per_item("image") == most_tokens(cfg, 4) < (1 + 16) * 16
    assert plan.tokens_per_item("video") == 3 * 2 * 2 + 1 < 3 * 16 + 1  # frames x pooled 2x2 + newline
    assert all(item_tokens((h, w), cfg, 4) <= plan.tokens_per_item("image")
               for h in (10, 40, 90, 128, 200) for w in (10, 40, 90, 128, 200))


def test_a_projector_that_changes_the_token_count_is_refused_before_building() -> None:
    from mmhub.errors import SpecError
    from mmhub.spec import load_spec
    from mmhub.validation import plan_spec

    llama = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 300, "max_position_embeddings": 512}
    spec = {"name": "anyres-resampler",
            "encoders": {"image": {"type": "anyres", "tower": TOWER, "grid_pinpoints": PINPOINTS, "tile_size": TILE}},
            "projectors": {"image": {"type": "perceiver", "num_latents": 8}},
            "backbone": {"type": "hf_causal_lm", "config": llama, "tokenizer": "byte"}, "template": "chatml"}
    with pytest.raises(SpecError, match=r"projectors.image: the anyres encoder arranges its tokens after the "
                                        r"projector, which must keep their count \(88 in, perceiver gives 8\)"):
        plan_spec(load_spec(spec))


def test_a_saved_anyres_model_reloads_with_the_same_logits(tmp_path) -> None:
    from mmhub import build, load

    llama = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 300, "max_position_embeddings": 512}
    model = build({"name": "anyres-save",
                   "encoders": {"image": {"type": "anyres", "tower": TOWER, "grid_pinpoints": PINPOINTS,
                                          "tile_size": TILE}},
                   "projectors": {"image": {"type": "mlp", "newline": True}},
                   "backbone": {"type": "hf_causal_lm", "config": llama, "tokenizer": "byte"},
                   "template": "chatml"})
    batch = model.batch(["<image>\nHi", "A <image> B"], [{"image": [picture(40, 90)]}, {"image": [picture(90, 40)]}])
    with torch.no_grad():
        want = model(**batch).logits
        back = load(model.save_pretrained(tmp_path / "m"))
        got = back(**back.batch(["<image>\nHi", "A <image> B"],
                                [{"image": [picture(40, 90)]}, {"image": [picture(90, 40)]}])).logits
    assert torch.equal(want, got)
    assert torch.equal(back.projectors["image"].image_newline, model.projectors["image"].image_newline)


@pytest.mark.parametrize("pack", [None, 1024])
def test_the_trainer_runs_anyres_images_of_many_sizes(pack: int | None, tmp_path) -> None:
    """mmhub's trainer on images of different sizes (each its own token count), the tower frozen: its features are
    not cached (they need the images after the projector), plain and packed rows, the projector and newline learn."""
    from mmhub.data import Sample
    from mmhub.train.run import train

    llama = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 300, "max_position_embeddings": 1024, "initializer_range": 0.02}
    sizes = [(40, 90), (90, 40), (64, 64), (20, 25)]
    data = [Sample(str(i), [{"role": "user", "content": "<image>\nWhat is it?"},
                            {"role": "assistant", "content": f"Picture {i}."}], {"image": [picture(*sizes[i % 4], i)]})
            for i in range(8)]
    stage = {"name": "align", "train": {"projectors": "full"}, "max_steps": 2, "batch_size": 4, "lr": 1e-2,
             "save_every": None, **({"pack": pack} if pack else {})}
    spec = {"name": "anyres-train", "seed": 1,
            "encoders": {"image": {"type": "anyres", "tower": TOWER, "grid_pinpoints": PINPOINTS, "tile_size": TILE}},
            "projectors": {"image": {"type": "mlp", "newline": True}},
            "backbone": {"type": "hf_causal_lm", "config": llama, "tokenizer": "byte"},
            "template": "chatml", "stages": [stage]}
    summary = train(spec, out=tmp_path / "run", datasets={"align": data}, progress_bar=False)
    assert summary["align"]["samples"] == 8, summary
    from safetensors.torch import load_file

    start = build_model(spec)
    trained = load_file(str(tmp_path / "run" / "align" / "model" / "model.safetensors"))
    assert not torch.equal(trained["projectors.image.image_newline"], start.projectors["image"].image_newline)
    assert summary["align"]["feature_cache"] == {} and summary["align"]["steps"] == 2  # the frozen tower: no cache


def build_model(spec: dict) -> object:
    from mmhub import build

    return build({k: v for k, v in spec.items() if k != "stages"})


def test_a_tile_size_other_than_the_towers_is_named() -> None:
    from mmhub import build
    from mmhub.errors import SpecError

    llama = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 300, "max_position_embeddings": 1024}
    with pytest.raises(SpecError, match=r"gave 36 tokens per 48-pixel tile but describes 16 .* set tile_size"):
        build({"name": "bad-tile", "encoders": {"image": {"type": "anyres", "tower": TOWER, "tile_size": 48,
                                                          "grid_pinpoints": [[48, 96], [96, 48]]}},
               "projectors": {"image": {"type": "mlp", "newline": True}},
               "backbone": {"type": "hf_causal_lm", "config": llama, "tokenizer": "byte"}, "template": "chatml"})


class TestAnyResContract(EncoderTests):
    """The shared encoder checks (describe = forward's shape, settings, dtype moves, gradients) on the example."""

    component = AnyResEncoder
