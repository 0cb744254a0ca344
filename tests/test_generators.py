"""The built-in diffusers generators: Stable Diffusion (image), text-to-video, AudioLDM (audio).

Tiny random pipelines built from config (steps=2), plus a save_pretrained / ``source:`` round trip.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from mmhub import weights as weight_sources
from mmhub.errors import InputError, WeightsNotFoundError
from mmhub.interfaces import Audio, BuildContext
from mmhub.registry import get_registry
from mmhub.testing import torch_threads

REG = get_registry()
NAMES = ("stable_diffusion", "text_to_video", "audioldm")
# tiny example settings: (cond_len, cond_dim) and the shape of one generated item
EXPECTED = {"stable_diffusion": ((16, 16), (32, 32)), "text_to_video": ((16, 16), (2, 32, 32)),
            "audioldm": ((1, 8), (128,))}
CAPTIONS = ["a red circle", "two blue squares", ""]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are op-overhead bound; on a busy few-core CPU one thread avoids oversubscription stalls."""
    with torch_threads(1):
        yield


def ctx() -> BuildContext:
    return BuildContext(resolve=lambda uri: weight_sources.resolve(uri, REG), registry=REG)


def settings(name: str, **changes: Any) -> dict[str, Any]:
    cls = REG.get("generator", name).cls
    return {**cls.example_settings, **changes}


def make(name: str, seed: int = 0, **changes: Any):
    cls = REG.get("generator", name).cls
    config = cls.Config.model_validate(settings(name, **changes))
    torch.manual_seed(seed)
    return cls(config, ctx()).eval()


def as_array(item: Any) -> np.ndarray:
    if isinstance(item, Audio):
        return item.samples
    if isinstance(item, list):
        return np.stack([np.asarray(f) for f in item])
    return np.asarray(item)


def test_registered_with_metadata() -> None:
    assert set(NAMES) <= set(REG.names("generator"))
    for name in NAMES:
        info = REG.components["generator"][name]
        meta = info.metadata()
        assert info.plugin == "mmhub.generators" and meta["library"] == "diffusers"
        assert meta["out_dim"] and meta["tokens"] and meta["doc"] and meta["modalities_out"]
        assert {"source", "config", "scheduler", "steps", "guidance_scale", "dtype"} <= set(meta["settings"])


@pytest.mark.parametrize("name", NAMES)
def test_build_shapes_and_determinism(name: str) -> None:
    (cond_len, cond_dim), item_shape = EXPECTED[name]
    cls = REG.get("generator", name).cls
    facts = cls.describe(cls.Config.model_validate(settings(name)), ctx())
    assert (facts.modality, facts.cond_len, facts.cond_dim) == (cls.modalities_out[0], cond_len, cond_dim)
    make(name)  # the first build imports diffusers' pipeline modules (seconds); time a second one
    t = time.perf_counter()
    gen = make(name)
    assert time.perf_counter() - t < 2.0, "the tiny example should build in well under a second"
    assert not gen.has_weight_source()
    cond = gen.encode_text(CAPTIONS)
    assert cond.shape == (len(CAPTIONS), cond_len, cond_dim) and not cond.requires_grad
    items = gen.generate(cond, seed=0, steps=2)
    assert len(items) == len(CAPTIONS)
    arrays = [as_array(i) for i in items]
    if name == "stable_diffusion":
        assert all(isinstance(i, Image.Image) and i.size == gen.output_size == (32, 32) for i in items)
        assert arrays[0].shape == (*item_shape, 3)
    elif name == "text_to_video":
        assert all(isinstance(v, list) and all(isinstance(f, Image.Image) for f in v) for v in items)
        assert arrays[0].shape == (*item_shape, 3) and gen.output_size == (32, 32)
    else:
        assert all(isinstance(a, Audio) and a.sample_rate == gen.sample_rate == 16000 for a in items)
        assert arrays[0].shape == item_shape and arrays[0].dtype == np.float32
        assert np.abs(arrays[0]).max() <= 1.0 and len(arrays[0]) == round(gen.audio_length_s * 16000)
    again = [as_array(i) for i in gen.generate(cond, seed=0, steps=2)]
    assert all(np.array_equal(a, b) for a, b in zip(arrays, again, strict=True)), "same seed, different output"
    other = [as_array(i) for i in gen.generate(cond, seed=1, steps=2)]
    assert not all(np.array_equal(a, b) for a, b in zip(arrays, other, strict=True)), "the seed changed nothing"


@pytest.mark.parametrize("name", NAMES)
def test_guidance_uses_empty_caption_as_negative(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = make(name)
    cond = gen.encode_text(CAPTIONS[:2])
    seen: list[list[str]] = []
    encode = gen.encode_for_pipeline
    monkeypatch.setattr(gen, "encode_for_pipeline", lambda captions: seen.append(captions) or encode(captions))
    plain = [as_array(i) for i in gen.generate(cond, seed=0, steps=2, guidance_scale=1.0)]
    assert seen == []
    guided = [as_array(i) for i in gen.generate(cond, seed=0, steps=2, guidance_scale=4.0)]
    assert seen == [[""]]
    assert len(guided) == 2 and not all(np.array_equal(a, b) for a, b in zip(plain, guided, strict=True))


def test_generate_is_the_pipeline_with_prompt_embeds() -> None:
    gen = make("stable_diffusion", scheduler="EulerDiscrete")
    cond = gen.encode_text(CAPTIONS[:2])
    ours = gen.generate(cond, seed=3, steps=2, guidance_scale=5.0)
    from diffusers import EulerDiscreteScheduler

    pipe = gen.pipeline
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=gen.encode_text([""]).expand(2, -1, -1),
                      num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(3),
                      height=32, width=32).images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, theirs, strict=True))
    assert torch.equal(cond, pipe.encode_prompt(CAPTIONS[:2], "cpu", 1, False)[0])


@pytest.mark.parametrize("scheduler", ["DDIM", "ddpm", "EulerDiscreteScheduler", "DPMSolverMultistep", "PNDM"])
def test_every_allowed_scheduler_runs(scheduler: str) -> None:
    gen = make("stable_diffusion", scheduler=scheduler)
    assert type(gen.pipeline.scheduler).__name__ == f"{gen.scheduler_kind}Scheduler"
    images = gen.generate(gen.encode_text(["x"]), seed=0, steps=2)
    assert images[0].size == (32, 32)


def test_encode_text_ignores_train_mode() -> None:
    gen = make("audioldm")  # CLAP's text encoder has dropout 0.1
    want = gen.encode_text(CAPTIONS)
    gen.train()
    assert torch.equal(gen.encode_text(CAPTIONS), want) and gen.training


# ---- errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,bad", [("stable_diffusion", (2, 16, 8)), ("stable_diffusion", (2, 16)),
                                      ("text_to_video", (1, 77, 16)), ("audioldm", (2, 8))])
def test_wrong_conditioning_shape_names_both(name: str, bad: tuple[int, ...]) -> None:
    gen = make(name)
    (cond_len, cond_dim), _ = EXPECTED[name]
    with pytest.raises(InputError) as err:
        gen.generate(torch.zeros(bad), steps=1)
    assert f"(N, {cond_len}, {cond_dim})" in str(err.value) and str(bad) in str(err.value)


def test_unknown_scheduler_lists_allowed() -> None:
    cls = REG.get("generator", "stable_diffusion").cls
    with pytest.raises(ValidationError, match="unknown scheduler 'LMSDiscrete'; allowed: DDIM, DDPM, EulerDiscrete, "
                                              "DPMSolverMultistep, PNDM"):
        cls.Config.model_validate(settings("stable_diffusion", scheduler="LMSDiscrete"))


def test_bad_settings_are_rejected() -> None:
    cls = REG.get("generator", "stable_diffusion").cls
    with pytest.raises(ValidationError, match="exactly one of `source`"):
        cls.Config.model_validate({"steps": 2})
    with pytest.raises(ValidationError, match="exactly one of `source`"):
        cls.Config.model_validate({"source": "/x", "config": {}})
    with pytest.raises(ValidationError, match="not a multiple of 8"):
        cls.Config.model_validate(settings("stable_diffusion", height=30))
    with pytest.raises(ValidationError, match="extra"):
        cls.Config.model_validate({"config": {"unet": {}, "vocoder": {}}})


def test_mismatched_widths_name_both_numbers() -> None:
    cls = REG.get("generator", "stable_diffusion").cls
    config = cls.Config.model_validate({"config": {"unet": {"cross_attention_dim": 32}}})
    with pytest.raises(InputError, match="cross_attention_dim is 32 but config.text_encoder.hidden_size is 16"):
        cls.describe(config, ctx())
    audio = REG.get("generator", "audioldm").cls
    config = audio.Config.model_validate({"config": {"unet": {"projection_class_embeddings_input_dim": 4}}})
    with pytest.raises(InputError, match="input_dim is 4 but config.text_encoder.projection_dim is 8"):
        audio.describe(config, ctx())


def test_missing_or_wrong_source_folder(tmp_path: Path) -> None:
    cls = REG.get("generator", "stable_diffusion").cls
    missing = tmp_path / "nowhere"
    with pytest.raises(WeightsNotFoundError, match=f"stable_diffusion: source '{missing}' not found"):
        cls.describe(cls.Config.model_validate({"source": str(missing)}), ctx())
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match="no model_index.json"):
        cls(cls.Config.model_validate({"source": str(tmp_path / "empty")}), ctx())


# ---- source: a local diffusers folder ----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_source_folder_round_trip(name: str, tmp_path: Path) -> None:
    built = make(name)
    folder = tmp_path / name
    built.pipeline.save_pretrained(str(folder))
    cls = REG.get("generator", name).cls
    config = cls.Config.model_validate({"source": str(folder), "steps": 2, "guidance_scale": 1.0,
                                        **({"num_frames": 2} if name == "text_to_video" else {})})
    context = ctx()
    assert cls.describe(config, context) == built.cond_facts
    assert str(folder) in context.weight_files
    loaded = cls(config, context).eval()
    assert loaded.has_weight_source() and loaded.scheduler_kind == "DDIM"
    cond = built.encode_text(CAPTIONS)
    assert torch.equal(loaded.encode_text(CAPTIONS), cond)
    a = [as_array(i) for i in built.generate(cond, seed=5, steps=2, guidance_scale=2.0)]
    b = [as_array(i) for i in loaded.generate(cond, seed=5, steps=2, guidance_scale=2.0)]
    for x, y in zip(a, b, strict=True):
        if name == "audioldm":  # float samples: loaded tensors sit at other memory alignments (other SIMD rounding)
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
        else:  # uint8 pixels
            assert np.array_equal(x, y)


def test_describe_reads_only_json(tmp_path: Path) -> None:
    built = make("stable_diffusion")
    full, bare = tmp_path / "full", tmp_path / "bare"
    built.pipeline.save_pretrained(str(full))
    for path in full.rglob("*.json"):  # configs only, no weights
        (bare / path.relative_to(full)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, bare / path.relative_to(full))
    cls = REG.get("generator", "stable_diffusion").cls
    assert not list(bare.rglob("*.safetensors"))
    facts = cls.describe(cls.Config.model_validate({"source": str(bare)}), ctx())
    assert (facts.cond_len, facts.cond_dim) == (16, 16)
    unet = json.loads((bare / "unet/config.json").read_text())
    (bare / "unet/config.json").write_text(json.dumps({**unet, "cross_attention_dim": 24}))
    with pytest.raises(InputError, match="hidden_size is 16 but the UNet's cross_attention_dim is 24"):
        cls.describe(cls.Config.model_validate({"source": str(bare)}), ctx())


def test_sizes_from_settings() -> None:
    gen = make("stable_diffusion", config={"sample_size": 8}, height=16, width=24)
    assert gen.output_size == (24, 16)
    assert gen.generate(gen.encode_text(["x"]), seed=0, steps=1)[0].size == (24, 16)
    assert make("stable_diffusion", config={"unet": {"sample_size": 8}}).output_size == (16, 16)
    video = make("text_to_video", num_frames=3, height=16, width=16)
    frames = video.generate(video.encode_text(["x"]), seed=0, steps=1)[0]
    assert len(frames) == 3 and frames[0].size == (16, 16)
    audio = make("audioldm", audio_length_s=0.02)
    assert audio.generate(audio.encode_text(["x"]), seed=0, steps=1)[0].samples.shape == (320,)
