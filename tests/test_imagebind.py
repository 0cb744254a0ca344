"""ImageBind (Girdhar et al. 2023): the `imagebind` encoder, its Kaldi-fbank audio front end and the converter from
the official checkpoint's key layout (``modality_preprocessors.*``, ``modality_trunks.*``, ``modality_heads.*``,
``modality_postprocessors.*``).

The official layout is written out here independently of the encoder (`official_state`: ImageBind's module tree, key
by key, with random tensors at tiny width), and the reference forward (`reference_embedding`) is the paper's
equations on those tensors, not the encoder's modules.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmhub import weights as weight_sources
from mmhub.errors import InputError, WeightsNotFoundError
from mmhub.interfaces import BuildContext
from mmhub.registry import get_registry
from mmhub.testing import sample_item

REG = get_registry()
# (embed_dim, blocks, heads) per trunk at tiny width; out_embed_dim 24
SIZES = {"vision": (32, 2, 2), "audio": (32, 2, 4), "depth": (16, 1, 2), "thermal": (16, 1, 2), "imu": (16, 1, 2)}
OUT = 24
TINY = {"trunks": list(SIZES), "out_embed_dim": OUT, "image_size": 32, "patch_size": 16, "num_frames": 4,
        "imu_length": 80, **{m: {"embed_dim": d, "num_blocks": b, "num_heads": h} for m, (d, b, h) in SIZES.items()}}
LOGIT_SCALE = {"audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0}  # ImageBind's fixed post-processor scales


@pytest.fixture
def ctx() -> BuildContext:
    return BuildContext(resolve=lambda uri: weight_sources.resolve(uri, REG), registry=REG)


def build(settings: dict, ctx: BuildContext, seed: int = 0):
    cls = REG.get("encoder", "imagebind").cls
    config = cls.Config.model_validate(settings)
    facts = cls.describe(config, ctx)
    torch.manual_seed(seed)
    return cls(config, ctx).eval(), facts


def official_state(seed: int = 0, text: bool = True) -> dict[str, torch.Tensor]:
    """A random state dict in ImageBind's own key layout (imagebind_model.py) at the `TINY` sizes, with the text
    tower too (mmhub has no ImageBind text side: the converter must drop it and say so)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def ln(prefix: str, d: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + r(d, scale=0.1), f"{prefix}.bias": r(d, scale=0.1)}

    s: dict[str, torch.Tensor] = {}
    grid = (32 // 16) ** 2
    audio_tokens = ((128 - 16) // 10 + 1) * ((204 - 16) // 10 + 1)  # 12 x 19 = 228
    pre = "modality_preprocessors"
    dv, da, dd, dt, di = (SIZES[m][0] for m in ("vision", "audio", "depth", "thermal", "imu"))
    s |= {f"{pre}.vision.cls_token": r(1, 1, dv), f"{pre}.vision.rgbt_stem.proj.1.weight": r(dv, 3, 2, 16, 16),
          f"{pre}.vision.pos_embedding_helper.pos_embed": r(1, 1 + grid, dv)}
    s |= {f"{pre}.audio.cls_token": r(1, 1, da), f"{pre}.audio.rgbt_stem.proj.weight": r(da, 1, 16, 16, scale=0.05),
          f"{pre}.audio.pos_embedding_helper.pos_embed": r(1, 1 + audio_tokens, da),
          **ln(f"{pre}.audio.rgbt_stem.norm_layer", da)}
    s |= {f"{pre}.depth.cls_token": r(1, 1, dd), f"{pre}.depth.depth_stem.proj.weight": r(dd, 1, 16, 16, scale=0.05),
          f"{pre}.depth.pos_embedding_helper.pos_embed": r(1, 1 + grid, dd),
          **ln(f"{pre}.depth.depth_stem.norm_layer", dd)}
    s |= {f"{pre}.thermal.cls_token": r(1, 1, dt), f"{pre}.thermal.rgbt_stem.proj.weight": r(dt, 1, 16, 16, scale=0.05),
          f"{pre}.thermal.pos_embedding_helper.pos_embed": r(1, 1 + grid, dt),
          **ln(f"{pre}.thermal.rgbt_stem.norm_layer", dt)}
    s |= {f"{pre}.imu.cls_token": r(1, 1, di), f"{pre}.imu.pos_embed": r(1, 1 + 80 // 8, di),
          f"{pre}.imu.imu_stem.proj.weight": r(di, 48), **ln(f"{pre}.imu.imu_stem.norm_layer", di)}
    trunks = {m: (d, b, m != "vision") for m, (d, b, _) in SIZES.items()}
    if text:
        s |= {f"{pre}.text.token_embedding.weight": r(100, 16), f"{pre}.text.pos_embed": r(1, 77, 16),
              f"{pre}.text.mask": torch.full((77, 77), float("-inf")).triu(1)}
        trunks["text"] = (16, 1, False)
    for m, (d, blocks, bias_kv) in trunks.items():
        t = f"modality_trunks.{m}"
        if m == "vision":
            s |= ln(f"{t}.pre_transformer_layer.0", d)
        for i in range(blocks):
            b = f"{t}.blocks.{i}"
            s |= {f"{b}.attn.in_proj_weight": r(3 * d, d), f"{b}.attn.in_proj_bias": r(3 * d),
                  f"{b}.attn.out_proj.weight": r(d, d), f"{b}.attn.out_proj.bias": r(d),
                  f"{b}.mlp.fc1.weight": r(4 * d, d), f"{b}.mlp.fc1.bias": r(4 * d),
                  f"{b}.mlp.fc2.weight": r(d, 4 * d), f"{b}.mlp.fc2.bias": r(d),
                  **ln(f"{b}.norm_1", d), **ln(f"{b}.norm_2", d)}
            if bias_kv:
                s |= {f"{b}.attn.bias_k": r(1, 1, d), f"{b}.attn.bias_v": r(1, 1, d)}
        h = f"modality_heads.{m}"
        if m == "text":
            s |= {**ln(f"{h}.proj.0", d), f"{h}.proj.1.weight": r(OUT, d)}
            s[f"modality_postprocessors.{m}.1.log_logit_scale"] = torch.tensor(math.log(1 / 0.07))
        else:
            s |= {**ln(f"{h}.0", d), f"{h}.{3 if m == 'imu' else 2}.weight": r(OUT, d)}
        if m in LOGIT_SCALE:
            s[f"modality_postprocessors.{m}.1.log_logit_scale"] = torch.tensor(math.log(LOGIT_SCALE[m]))
    return s


def _layer_norm(x: torch.Tensor, s: dict, prefix: str, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * s[f"{prefix}.weight"] + s[f"{prefix}.bias"]


def _block(x: torch.Tensor, s: dict, b: str, heads: int) -> torch.Tensor:
    """A pre-LN block: x + Attn(LN1 x), then x + MLP(LN2 x); the attention with a learned bias key/value appended
    to every sequence when the trunk has one (ImageBind's add_bias_kv), LayerNorm eps 1e-6, exact GELU."""
    n, length, d = x.shape
    y = _layer_norm(x, s, f"{b}.norm_1", 1e-6)
    q, k, v = (y @ s[f"{b}.attn.in_proj_weight"].T + s[f"{b}.attn.in_proj_bias"]).split(d, dim=-1)
    if f"{b}.attn.bias_k" in s:
        k = torch.cat([k, s[f"{b}.attn.bias_k"].expand(n, 1, d)], dim=1)
        v = torch.cat([v, s[f"{b}.attn.bias_v"].expand(n, 1, d)], dim=1)
    hd = d // heads
    q, k, v = (t.reshape(n, t.shape[1], heads, hd).transpose(1, 2) for t in (q, k, v))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
    att = att.transpose(1, 2).reshape(n, length, d) @ s[f"{b}.attn.out_proj.weight"].T + s[f"{b}.attn.out_proj.bias"]
    x = x + att
    y = _layer_norm(x, s, f"{b}.norm_2", 1e-6)
    hidden = y @ s[f"{b}.mlp.fc1.weight"].T + s[f"{b}.mlp.fc1.bias"]
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return x + hidden @ s[f"{b}.mlp.fc2.weight"].T + s[f"{b}.mlp.fc2.bias"]


def reference_embedding(s: dict, x: torch.Tensor, trunk: str) -> torch.Tensor:
    """ImageBind's embedding of `x` from the paper's equations on an official-layout state dict: patchify (a
    kernel = stride conv; vision: the image repeated to 2 frames under a 2 x p x p kernel; audio: 16 x 16 every 10),
    the stem's LayerNorm (not vision), [CLS; patches] + positions, the vision trunk's pre-LayerNorm, the blocks, the
    head (LayerNorm, the CLS token, a linear map) and the post-processor (L2 norm, times the fixed logit scale)."""
    pre = f"modality_preprocessors.{trunk}"
    if trunk == "vision":
        w = s[f"{pre}.rgbt_stem.proj.1.weight"]
        clip = x if x.ndim == 5 else x[:, :, None].repeat(1, 1, 2, 1, 1)  # an image: the same frame twice
        tokens = F.conv3d(clip, w, stride=w.shape[2:])
    else:
        stem = "depth_stem" if trunk == "depth" else "rgbt_stem"
        w = s[f"{pre}.{stem}.proj.weight"]
        tokens = F.conv2d(x, w, stride=10 if trunk == "audio" else w.shape[-1])
    tokens = tokens.flatten(2).transpose(1, 2)
    if trunk != "vision":
        tokens = _layer_norm(tokens, s, f"{pre}.{stem}.norm_layer", 1e-5)
    cls = s[f"{pre}.cls_token"].expand(len(x), -1, -1)
    h = torch.cat([cls, tokens], dim=1) + s[f"{pre}.pos_embedding_helper.pos_embed"]
    if trunk == "vision":
        h = _layer_norm(h, s, "modality_trunks.vision.pre_transformer_layer.0", 1e-6)
    for i in range(SIZES[trunk][1]):
        h = _block(h, s, f"modality_trunks.{trunk}.blocks.{i}", SIZES[trunk][2])
    e = _layer_norm(h, s, f"modality_heads.{trunk}.0", 1e-6)[:, 0] @ s[f"modality_heads.{trunk}.2.weight"].T
    e = e / e.norm(dim=-1, keepdim=True)
    return e * min(LOGIT_SCALE.get(trunk, 1.0), 100.0)


def kaldi_melspec(wave: np.ndarray) -> torch.Tensor:
    """ImageBind's data.py audio path for one 2 s clip at 16 kHz: torchaudio's Kaldi fbank, padded/cut to 204 frames,
    normalised with mean -4.268 and std 9.138."""
    import torchaudio

    w = torch.from_numpy(np.asarray(wave, dtype=np.float32))[None]
    w = w - w.mean()
    fb = torchaudio.compliance.kaldi.fbank(w, htk_compat=True, sample_frequency=16000, use_energy=False,
                                           window_type="hanning", num_mel_bins=128, dither=0.0, frame_length=25,
                                           frame_shift=10).T
    fb = F.pad(fb, (0, 204 - fb.shape[1])) if fb.shape[1] < 204 else fb[:, :204]
    return ((fb - -4.268) / 9.138)[None]  # (1, 128, 204)


# ------------------------------------------------------------------------------------------------ audio front end
def test_imagebind_audio_front_end_is_kaldi_fbank(ctx) -> None:
    enc, _ = build(TINY, ctx)
    rng = np.random.default_rng(0)
    t = np.arange(32000, dtype=np.float32) / 16000
    wave = (0.4 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(32000)).astype(np.float32)
    got = enc.preprocess(wave, "audio")
    assert got.shape == (1, 128, 204)
    torch.testing.assert_close(got, kaldi_melspec(wave), rtol=0, atol=1e-5)
    short = sample_item("audio")  # 1 s: ImageBind pads the fbank with zeros (before normalising) to 204 frames
    got = enc.preprocess(short, "audio")
    torch.testing.assert_close(got, kaldi_melspec(short), rtol=0, atol=1e-5)
    assert torch.allclose(got[0, :, -50:], torch.tensor(4.268 / 9.138))


# ------------------------------------------------------------------------------------------------ converter
def test_converter_loads_the_official_layout_with_nothing_missing(ctx, tmp_path) -> None:
    from safetensors.torch import save_file

    from mmhub.importers.convert_imagebind import convert_imagebind

    state = official_state()
    converted, settings, dropped = convert_imagebind(state, trunks=list(SIZES),
                                                     num_heads={m: h for m, (_, _, h) in SIZES.items()},
                                                     settings={"image_size": 32, "imu_length": 80})
    assert sorted(dropped) == sorted(k for k in state if ".text." in k)  # mmhub has no ImageBind text side
    assert set(converted) == {k for k in state if ".text." not in k}
    for m, (d, b, h) in SIZES.items():  # sizes read off the tensors
        assert settings[m] == {"embed_dim": d, "num_blocks": b, "num_heads": h}, m
    assert settings["out_embed_dim"] == OUT and settings["patch_size"] == 16
    enc, facts = build({**TINY, **settings}, ctx)
    missing, unexpected = enc.load_state_dict(converted, strict=False)
    assert not missing and not unexpected
    # the file the presets read: written, then loaded by `pretrained` (strict, by name)
    save_file({k: v.contiguous() for k, v in converted.items()}, str(tmp_path / "ib.safetensors"))
    loaded, _ = build({**TINY, "pretrained": str(tmp_path / "ib.safetensors")}, ctx, seed=3)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, converted[k]), k
    # the published .pth itself loads too (its text tower left out, by name)
    torch.save(state, tmp_path / "imagebind_tiny.pth")
    direct, _ = build({**TINY, "pretrained": str(tmp_path / "imagebind_tiny.pth")}, ctx, seed=4)
    assert torch.equal(direct.state_dict()["modality_trunks.audio.blocks.1.attn.bias_k"],
                       state["modality_trunks.audio.blocks.1.attn.bias_k"])
    # output shapes: tokens (patch tokens through the head's LayerNorm + projection) and pooled (the embedding)
    assert facts.tokens_by_modality == {"image": 4, "video": 8, "audio": 228}
    for modality in ("image", "video", "audio"):
        items = torch.stack([loaded.preprocess(sample_item(modality, i), modality) for i in range(2)])
        with torch.no_grad():
            assert loaded(items, modality).shape == (2, facts.tokens_for(modality), OUT), modality
    for trunk, shape in (("depth", (2, 1, 32, 32)), ("thermal", (2, 1, 32, 32)), ("imu", (2, 6, 80))):
        with torch.no_grad():
            assert loaded(torch.randn(shape), trunk).shape == (2, 4 if trunk != "imu" else 10, OUT), trunk


def test_converter_names_what_does_not_fit(ctx) -> None:
    from mmhub.importers.convert_imagebind import convert_imagebind

    state = official_state(text=False)
    del state["modality_trunks.audio.blocks.1.norm_2.bias"]
    with pytest.raises(WeightsNotFoundError, match=r"modality_trunks\.audio\.blocks\.1\.norm_2\.bias"):
        convert_imagebind(state, trunks=["vision", "audio"], num_heads={"vision": 2, "audio": 4},
                          settings={"image_size": 32})
    no_imu = {k: v for k, v in official_state(text=False).items() if ".imu." not in k}
    with pytest.raises(WeightsNotFoundError, match=r"no modality_trunks\.imu\.\* tensors; drop 'imu'"):
        convert_imagebind(no_imu, trunks=["vision", "audio", "imu"])
    with pytest.raises(WeightsNotFoundError, match="'spare' is not an ImageBind trunk"):
        convert_imagebind(no_imu, trunks=["vision", "spare"])


# ------------------------------------------------------------------------------------------------ equations
def test_audio_and_vision_trunks_match_the_paper_equations(ctx) -> None:
    state = official_state(seed=1)
    pooled, _ = build({**TINY, "output": "pooled"}, ctx)
    pooled.load_state_dict({k: v for k, v in state.items() if ".text." not in k})
    rng = np.random.default_rng(1)
    wave = (0.3 * np.sin(2 * np.pi * 1000 * np.arange(32000) / 16000) + 0.1 * rng.standard_normal(32000))
    spec = kaldi_melspec(wave.astype(np.float32))[None]  # (1, 1, 128, 204): the exact preprocessing
    with torch.no_grad():
        got = pooled(pooled.preprocess(wave.astype(np.float32), "audio")[None], "audio")[:, 0]
        want = reference_embedding(state, spec, "audio")
        diff = (got - want).abs().max().item()
        assert diff < 2e-5, diff  # the audio embedding is 20 long (its logit scale): 1e-6 relative
        assert torch.allclose(got.norm(dim=-1), torch.tensor(20.0))  # the audio post-processor's fixed scale
        image = torch.randn(2, 3, 32, 32)
        diff_v = (pooled(image, "image")[:, 0] - reference_embedding(state, image, "vision")).abs().max().item()
        assert diff_v < 1e-5, diff_v
        depth = torch.randn(2, 1, 32, 32)
        diff_d = (pooled(depth, "depth")[:, 0] - reference_embedding(state, depth, "depth")).abs().max().item()
        assert diff_d < 1e-5, diff_d
        # video: clips of 2 frames, each through the Conv3d stem as it is (an image is repeated to 2 frames), the
        # clips' embeddings averaged (ImageBind's reduce over clips)
        frames = torch.randn(1, 4, 3, 32, 32)
        clips = [reference_embedding(state, frames[:, i:i + 2].transpose(1, 2), "vision") for i in (0, 2)]
        diff_clip = (pooled(frames, "video")[:, 0] - (clips[0] + clips[1]) / 2).abs().max().item()
        assert diff_clip < 1e-5, diff_clip
    print(f"audio trunk vs equations: max |diff| {diff:.2e}; vision {diff_v:.2e}; depth {diff_d:.2e}")


# ------------------------------------------------------------------------------------------------ settings, errors
def test_imagebind_huge_geometry_and_clear_errors(ctx) -> None:
    cls = REG.get("encoder", "imagebind").cls
    huge = cls.Config()
    facts = cls.describe(huge, ctx)
    # 224 px / 14 -> 256 patches per 2-frame clip; 2 s -> 128 x 204 fbank -> 12 x 19 patches of 16 every 10
    assert facts.tokens_by_modality == {"image": 256, "video": 256, "audio": 228} and facts.out_dim == 1024
    assert (huge.vision.embed_dim, huge.vision.num_blocks, huge.vision.num_heads) == (1280, 32, 16)
    assert (huge.audio.embed_dim, huge.audio.num_blocks, huge.audio.num_heads) == (768, 12, 12)
    enc, _ = build({**TINY, "trunks": ["vision"]}, ctx)
    with pytest.raises(InputError, match="trunks"):
        enc.preprocess(sample_item("audio"), "audio")
    with pytest.raises(InputError, match="imagebind takes"):
        enc.preprocess(sample_item("points"), "points")
    with pytest.raises(ValueError, match="num_frames"):
        cls.Config.model_validate({**TINY, "num_frames": 3})
