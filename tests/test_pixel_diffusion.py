"""pixel_diffusion: the small trainable text-to-image generator, its recipe (exact resume, export) and the
shape classifier that scores it; the shipped easy-VQA drawing model when it is in the checkout."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mmhub import weights as weight_sources
from mmhub.errors import InputError, WeightsNotFoundError
from mmhub.interfaces import BuildContext
from mmhub.recipes import easyvqa_draw as recipe
from mmhub.registry import get_registry

REG = get_registry()
CLS = REG.get("generator", "pixel_diffusion").cls
TINY = CLS.example_settings
SHIPPED = recipe.DEMO / recipe.SETTINGS_FILE
CLASSIFIER = recipe.DEMO / "shape_classifier.safetensors"


def ctx() -> BuildContext:
    return BuildContext(resolve=lambda uri: weight_sources.resolve(uri, REG), registry=REG)


def make(seed: int = 0, **over):
    torch.manual_seed(seed)
    return CLS(CLS.Config.model_validate({**TINY, **over}), ctx()).eval()


def test_tiny_example_builds_and_has_the_described_shapes():
    c = ctx()
    facts = CLS.describe(CLS.Config.model_validate(TINY), c)
    assert (facts.modality, facts.cond_len, facts.cond_dim) == ("image", TINY["cond_len"], TINY["cond_dim"])
    assert any("easyvqa-words" in uri for uri in c.weight_files)  # the word list is recorded for the spec's hashes
    assert CLS.summary() and CLS.library == "diffusers" and CLS.modalities_out == ("image",)
    g = make()
    cond = g.encode_text(["a red circle", "a blue triangle", ""])
    assert cond.shape == (3, facts.cond_len, facts.cond_dim) and torch.isfinite(cond).all()
    images = g.generate(cond[:2], seed=0)
    assert len(images) == 2 and all(isinstance(im, Image.Image) and im.size == (16, 16) and im.mode == "RGB"
                                    for im in images)
    big = make(output_size=24, upscale="nearest").generate(cond[:1], seed=0, steps=1, guidance_scale=1.0)
    assert big[0].size == (24, 24)
    with pytest.raises(InputError, match=r"\(N, 6, 16\)"):
        g.generate(torch.zeros(1, 5, 16))
    ids = g.token_ids(["a red circle", "a red circle with many more words than fit"])
    assert ids.shape == (2, TINY["cond_len"]) and ids[1, -1] == g.tokenizer.eos_token_id
    loss = g.loss(torch.rand(2, 3, 16, 16) * 2 - 1, ids, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    v = make(prediction_type="v_prediction").loss(torch.zeros(2, 3, 16, 16), ids, torch.Generator().manual_seed(0))
    assert torch.isfinite(v)


def test_generation_is_deterministic_given_a_seed():
    g = make()
    cond = g.encode_text(["a red circle"])
    a, b, c = (g.sample(cond, seed=s) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    ddim = make(sampler="ddim")
    ddim.load_state_dict(g.state_dict())
    assert torch.equal(ddim.sample(cond, seed=3), ddim.sample(cond, seed=3))


def test_safetensors_round_trip_and_pretrained_loading(tmp_path):
    g = make(seed=0)
    path = tmp_path / "g.safetensors"
    save_file({k: v.contiguous() for k, v in g.state_dict().items()}, str(path))
    cond = g.encode_text(["a green rectangle"])
    for uri in (str(path), f"file:{path}"):
        fresh = make(seed=1, pretrained=uri)
        assert torch.equal(fresh.encode_text(["a green rectangle"]), cond)
        assert torch.equal(fresh.sample(cond, seed=0), g.sample(cond, seed=0))
    half = tmp_path / "half.safetensors"  # fp16 storage (the shipped model's) loads into fp32 parameters
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in g.state_dict().items()},
              str(half))
    loaded = make(seed=1, pretrained=str(half))
    assert next(loaded.parameters()).dtype == torch.float32
    assert torch.allclose(loaded.encode_text(["a green rectangle"]), cond, atol=5e-2)


def test_a_bad_pretrained_file_gives_a_clear_error(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsNotFoundError, match="nope.safetensors"):
        CLS.describe(CLS.Config.model_validate({**TINY, "pretrained": str(missing)}), ctx())
    with pytest.raises(WeightsNotFoundError, match="nope.safetensors"):
        make(pretrained=str(missing))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    with pytest.raises(WeightsNotFoundError, match="not a readable safetensors file"):
        make(pretrained=str(junk))
    other = tmp_path / "other.safetensors"  # another architecture
    save_file({"unet.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(other))
    with pytest.raises(WeightsNotFoundError, match="another shape"):
        make(pretrained=str(other))
    partial = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in list(make().state_dict().items())[:3]}, str(partial))
    with pytest.raises(WeightsNotFoundError, match="missing tensor"):
        make(pretrained=str(partial))


def test_recipe_resumes_exactly_and_exports(tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = (torch.rand(16, 3, 16, 16, generator=gen) * 2 - 1, ["a red circle", "a blue triangle"] * 8)
    over = {"steps": 4, "batch": 4, "warmup": 1}
    recipe.train(tmp_path / "a", settings=dict(TINY), overrides=over, data=data, log_every=2)
    recipe.train(tmp_path / "b", settings=dict(TINY), overrides=over, data=data, log_every=2, stop_after=2)
    assert json.loads((tmp_path / "b/checkpoint/state.json").read_text())["step"] == 2
    with pytest.raises(SystemExit, match="--resume"):
        recipe.train(tmp_path / "b", settings=dict(TINY), overrides=over, data=data)
    recipe.train(tmp_path / "b", resume=True, data=data, log_every=2)
    for name in ("model", "ema", "optim"):
        a = load_file(str(tmp_path / f"a/checkpoint/{name}.safetensors"))
        b = load_file(str(tmp_path / f"b/checkpoint/{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    dest = recipe.export(tmp_path / "a", tmp_path / "export")
    settings = json.loads((dest / recipe.SETTINGS_FILE).read_text())
    assert settings["type"] == "pixel_diffusion" and settings["pretrained"].endswith("export/model.safetensors")
    model = recipe.load_draw_model(dest)
    assert model.draw(["a red circle"], steps=2)[0].size == (16, 16)
    with pytest.raises(WeightsNotFoundError, match="export"):
        recipe.load_draw_model(tmp_path / "a")


def test_outline_band_marks_the_figures_edge_and_the_loss_weights_it():
    from mmhub.generators.pixel_diffusion import outline_band

    x = torch.full((1, 3, 16, 16), 0.9)  # a pale background ...
    x[:, :, 4:12, 4:12] = torch.tensor([-1.0, -1.0, 0.8])[:, None, None]  # ... with a blue square in it
    band = outline_band(x)[0, 0]
    assert band.shape == (16, 16) and set(band.unique().tolist()) == {0.0, 1.0}
    assert band[3:13, 3:13].sum() == band.sum() == 10 * 10 - 6 * 6  # the 3-pixel ring around the square's edge
    assert band[8, 8] == 0 and band[0, 0] == 0  # not the interior, not the background
    g = make()
    ids = g.token_ids(["a blue rectangle"])
    plain = g.loss(x, ids, torch.Generator().manual_seed(0))
    same = g.loss(x, ids, torch.Generator().manual_seed(0), edge_weight=0.0)
    weighted = g.loss(x, ids, torch.Generator().manual_seed(0), edge_weight=4.0)
    assert torch.equal(plain, same) and not torch.allclose(weighted, plain)


def test_frozen_text_fine_tuning_keeps_the_caption_features(tmp_path):
    """A fine-tune with freeze_text starts from another run and exports a generator whose text encoder (what the
    drawing models' output projectors are aligned to) is the initial one, while the UNet moved."""
    gen = torch.Generator().manual_seed(0)
    data = (torch.rand(16, 3, 16, 16, generator=gen) * 2 - 1, ["a red circle", "a blue triangle"] * 8)
    over = {"steps": 3, "batch": 4, "warmup": 1}
    recipe.train(tmp_path / "a", settings=dict(TINY), overrides=over, data=data, log_every=2)
    recipe.train(tmp_path / "b", settings=dict(TINY), overrides={**over, "freeze_text": True, "edge_weight": 2.0,
                                                                  "seed": 1},
                 data=data, log_every=2, init=str(tmp_path / "a"))
    a = recipe.load_draw_model(recipe.export(tmp_path / "a", tmp_path / "ea", fp16=False))
    b = recipe.load_draw_model(recipe.export(tmp_path / "b", tmp_path / "eb", fp16=False))
    assert torch.equal(a.encode_text(["a red circle"]), b.encode_text(["a red circle"]))
    assert not torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)


def test_dominant_color_reads_easy_vqa_images():
    from mmhub.data.easy_vqa import EasyVQAConfig, EasyVQADataset

    ds = EasyVQADataset(EasyVQAConfig(split="test", task="caption", limit=24))
    for i in range(len(ds)):
        s = ds[i]
        assert recipe.dominant_color(Image.open(s.media["image"][0])) == s.messages[-1]["content"].split()[1]
    assert recipe.dominant_color(Image.new("RGB", (8, 8), "white")) is None


@pytest.mark.skipif(not CLASSIFIER.is_file(), reason="no trained shape classifier in this checkout")
def test_shape_classifier_recognises_easy_vqa_test_images():
    from mmhub.evaluation.shape_classifier import accuracy, load_classifier, load_images

    clf = load_classifier(CLASSIFIER)
    x, y = load_images("test", clf.size, limit=200)
    assert accuracy(clf, x, y) >= 0.97
    assert CLASSIFIER.stat().st_size < 1_000_000


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no exported easy-VQA drawing model in this checkout")
def test_shipped_drawing_model_draws_the_requested_colour():
    model = recipe.load_draw_model()
    assert (recipe.DEMO / recipe.WEIGHTS).stat().st_size < 10_000_000
    prompts = ["a red circle", "a blue rectangle", "a yellow triangle"]
    images = model.draw(prompts, seed=0, steps=10)
    assert [recipe.dominant_color(im) for im in images] == ["red", "blue", "yellow"]
    assert images[0].size == (model.config.output_size,) * 2
