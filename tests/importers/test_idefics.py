"""IDEFICS parity: mmhub's perceiver (layout idefics) and gated_xattn (layout idefics) against transformers' own
IDEFICS modules, then the whole imported model against ``IdeficsForVisionText2Text`` on the processor's inputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import IdeficsConfig
from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer
from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

from mmhub.backbones.gated_xattn import GatedXAttnConfig, IdeficsGatedLayer
from mmhub.importers.idefics import gated_state, perceiver_state
from mmhub.importers.run import load_strict
from mmhub.interfaces import BuildContext
from mmhub.projectors.perceiver import PerceiverConfig, PerceiverProjector

VISION = 24  # vision width (the resampler's and the cross-attention keys'), != the LM's 32
HIDDEN = 32


def tiny_config(**over: Any) -> IdeficsConfig:
    """A shrunk IDEFICS: byte vocabulary (261) + 2 additional rows, LM 32 wide, tower 24 wide on 28 px images."""
    perceiver = {"use_resampler": True, "resampler_n_latents": 3, "resampler_depth": 2, "resampler_n_heads": 2,
                 "resampler_head_dim": 8, "qk_layer_norms_perceiver": over.pop("qk_perceiver", False)}
    settings = dict(vocab_size=261, additional_vocab_size=2, hidden_size=HIDDEN, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, cross_layer_interval=1, use_resampler=True,
                    max_position_embeddings=128, pad_token_id=258, bos_token_id=256, eos_token_id=257,
                    vision_config={"embed_dim": VISION, "image_size": 28, "patch_size": 14, "num_hidden_layers": 2,
                                   "num_attention_heads": 2, "intermediate_size": 48},
                    perceiver_config=perceiver)
    settings.update(over)
    return IdeficsConfig(**settings)


def perturb(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> None:
    """Move every parameter away from its initialisation (gates off zero, norms off one), so parity means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def ctx() -> BuildContext:
    return BuildContext(resolve=lambda uri: uri, attention="auto")


# --- components ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qk_norm", [False, True])
def test_perceiver_idefics_layout_equals_idefics_resampler(qk_norm: bool) -> None:
    cfg = tiny_config(qk_perceiver=qk_norm)
    p = cfg.perceiver_config
    torch.manual_seed(0)
    ref = IdeficsPerceiverResampler(cfg, VISION, p.resampler_depth, p.resampler_n_heads, p.resampler_head_dim,
                                    p.resampler_n_latents).eval()
    perturb(ref)
    ours = PerceiverProjector(PerceiverConfig(in_dim=VISION, out_dim=VISION, layout="idefics", num_latents=3,
                                              depth=2, heads=2, head_dim=8, ff_mult=4, qk_norm=qk_norm), ctx()).eval()
    load_strict(ours, perceiver_state(ref.state_dict()), "perceiver")
    x = torch.randn(3, 5, VISION, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert got.shape == (3, 3, VISION)
    diff = float((got - want).abs().max())
    assert diff <= 1e-5, f"perceiver (qk_norm={qk_norm}) max abs diff {diff:.3g} > 1e-5"


def test_hf_vision_on_clip_config_equals_idefics_vision_transformer() -> None:
    """IdeficsVisionTransformer is CLIP's vision transformer: hf_vision on the clip_vision_model config, last block,
    CLS kept, no final LayerNorm, gives its last_hidden_state."""
    from transformers.models.idefics.vision import IdeficsVisionTransformer

    from mmhub.encoders.hf_vision_encoder import HFVisionEncoder
    from mmhub.importers.idefics import vision_settings

    cfg = tiny_config()
    torch.manual_seed(0)
    ref = IdeficsVisionTransformer(cfg.vision_config).eval()
    perturb(ref, 0.2)
    enc = HFVisionEncoder(HFVisionEncoder.Config.model_validate(
        {"config": vision_settings(cfg.vision_config), "select_layer": -1, "drop_cls": False}), ctx()).eval()
    load_strict(enc.model, ref.state_dict(), "tower")
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = ref(pixels).last_hidden_state, enc(pixels, "image")
    assert got.shape == want.shape == (2, 5, VISION)
    diff = float((got - want).abs().max())
    assert diff <= 1e-5, f"vision tower max abs diff {diff:.3g} > 1e-5"


def idefics_masks(index: torch.Tensor, valid: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What IdeficsModel.forward builds from the processor's image_attention_mask: the additive (B, 1, L, M*T) mask
    and the cross_attention_gate (B, L)."""
    M = valid.shape[1]
    onehot = torch.nn.functional.one_hot(index.clamp(min=0), M) * (index >= 0)[..., None]
    onehot = onehot * valid[:, None, :]
    expanded = onehot[..., None].expand(-1, -1, -1, T).reshape(*onehot.shape[:2], -1)
    additive = torch.where(expanded[:, None].bool(), torch.tensor(0.0), torch.finfo(torch.float32).min)
    gate = (additive == 0.0).any(dim=-1).float().squeeze(1)
    return additive, gate


@pytest.mark.parametrize(("alpha_type", "qk_norm"), [("float", False), ("vector", True)])
def test_gated_layer_idefics_layout_equals_idefics_layer(alpha_type: str, qk_norm: bool) -> None:
    cfg = tiny_config(alpha_type=alpha_type, qk_layer_norms=qk_norm)
    torch.manual_seed(0)
    ref = IdeficsGatedCrossAttentionLayer(cfg, layer_idx=0).eval()
    perturb(ref)
    settings = GatedXAttnConfig(dim=HIDDEN, num_layers=2, heads=4, layout="idefics", kv_dim=VISION, ff_dim=64,
                                activation="silu", norm_eps=cfg.rms_norm_eps, qk_norm=qk_norm, gate=alpha_type)
    ours = IdeficsGatedLayer(settings, "auto").eval()
    state = gated_state({f"0.{k}": v for k, v in ref.state_dict().items()})
    load_strict(ours, {k[len("layers.0."):]: v for k, v in state.items()}, "gated layer")
    g = torch.Generator().manual_seed(2)
    B, L, M, T = 2, 7, 2, 3
    x = torch.randn(B, L, HIDDEN, generator=g)
    media = torch.randn(B, M, T, VISION, generator=g)
    # row 0: two text tokens before any image, then image 0, then image 1; row 1 has only one real image
    index = torch.tensor([[-1, -1, 0, 0, 1, 1, 1], [-1, 0, 0, 0, 0, 0, 0]])
    valid = torch.tensor([[True, True], [True, False]])
    additive, gate = idefics_masks(index, valid, T)
    with torch.no_grad():
        want = ref(x, None, media.reshape(B, M * T, VISION), image_attention_mask=additive,
                   cross_attention_gate=gate)
        got = ours(x, media, valid, index, only_immediate=True)
    diff = float((got - want).abs().max())
    assert diff <= 1e-5, f"gated layer ({alpha_type}, qk_norm={qk_norm}) max abs diff {diff:.3g} > 1e-5"
    # tokens with no image get no cross-attention update, only the gated MLP
    assert not torch.allclose(got[0, :2], x[0, :2])


# --- the whole model -------------------------------------------------------------------------------------------------
LOGIT_TOL = 1e-4
IMAGE, FAKE = "<image>", "<fake_token_around_image>"


def tiny_checkpoint(folder: Any, **over: Any) -> Any:
    """A perturbed tiny IdeficsForVisionText2Text saved with its processor (byte tokenizer + IDEFICS's two extra
    tokens as the additional vocabulary rows 261 and 262)."""
    from transformers import IdeficsForVisionText2Text, IdeficsImageProcessor, IdeficsProcessor

    from mmhub.backbones.byte_tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [FAKE, IMAGE]})
    assert tok.convert_tokens_to_ids([FAKE, IMAGE]) == [261, 262]
    torch.manual_seed(0)
    hf = IdeficsForVisionText2Text(tiny_config(**over))
    perturb(hf, 0.2, seed=3)
    hf.save_pretrained(folder)
    IdeficsProcessor(IdeficsImageProcessor(image_size=28), tok).save_pretrained(folder)
    return folder


def picture(seed: int, size: tuple[int, int] = (37, 45)) -> Any:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def reference(folder: Any) -> tuple[Any, Any]:
    from transformers import AutoProcessor, IdeficsForVisionText2Text

    hf = IdeficsForVisionText2Text.from_pretrained(folder, dtype=torch.float32).eval()
    # the PIL backend resizes with PIL as mmhub's hf_vision does (the torchvision one differs by a grey level)
    return hf, AutoProcessor.from_pretrained(folder, backend="pil")


# the IDEFICS processor's prompt list (ints: images) and the same prompt as mmhub text (template idefics)
CASES = {
    "one_image": (["User:", 0, "Describe this image.\nAssistant:"], f"User:{IMAGE}Describe this image.\nAssistant:"),
    "two_interleaved": (["User:", 0, "What is this?", 1, "And this?\nAssistant:"],
                        f"User: {IMAGE} What is this? {IMAGE} And this?\nAssistant:"),
    "two_in_a_row": (["User:", 0, 1, "Compare them.\nAssistant:"], f"User:{IMAGE}{IMAGE}Compare them.\nAssistant:"),
    # after </s> IDEFICS's processor lets no token see an image until the next one (packed documents)
    "eos_then_image": (["User:", 0, "What is it?\nAssistant: A cat.</s>User: And this?", 1, "Say.\nAssistant:"],
                       f"User:{IMAGE}What is it?\nAssistant: A cat.</s>User: And this?{IMAGE}Say.\nAssistant:"),
    "eos_then_text": (["User:", 0, "What is it?\nAssistant: A cat.</s>User: Tell me more.\nAssistant:"],
                      f"User:{IMAGE}What is it?\nAssistant: A cat.</s>User: Tell me more.\nAssistant:"),
}


# the other switches: cross-attention before blocks 0 and 2 of 4, per-channel gates, q/k norms in both modules
VARIANT = {"cross_layer_interval": 2, "num_hidden_layers": 4, "alpha_type": "vector", "qk_layer_norms": True,
           "qk_perceiver": True}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: Any) -> Any:
    return tiny_checkpoint(tmp_path_factory.mktemp("idefics") / "tiny-idefics")


@pytest.fixture(scope="module")
def variant_folder(tmp_path_factory: Any) -> Any:
    return tiny_checkpoint(tmp_path_factory.mktemp("idefics") / "tiny-idefics-variant", **VARIANT)


def prompt_for(case: str) -> tuple[list[Any], str, list[Any]]:
    """(the IDEFICS processor's prompt list, the same prompt as mmhub text, its images)."""
    parts, text = CASES[case]
    images = [picture(i) for i in range(2)]
    used = [images[p] for p in parts if isinstance(p, int)]
    return [images[p] if isinstance(p, int) else p for p in parts], text, used


def logits(model: Any, batch: dict[str, Any], **media: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}, **media).logits


@pytest.mark.parametrize(("config", "case"), [("base", "one_image"), ("base", "two_interleaved"),
                                               ("base", "two_in_a_row"), ("base", "eos_then_image"),
                                               ("base", "eos_then_text"),
                                               ("variant", "two_interleaved")])
def test_imported_idefics_equals_transformers(request: Any, config: str, case: str) -> None:
    from mmhub.importers import import_checkpoint

    folder = request.getfixturevalue("folder" if config == "base" else "variant_folder")
    hf, processor = reference(folder)
    model = import_checkpoint(folder)
    prompt, text, used = prompt_for(case)
    inputs = processor(text=[prompt], return_tensors="pt")
    batch = model.batch([text], [{"image": used}])
    assert batch["input_ids"].tolist() == inputs["input_ids"].tolist(), "token ids differ from the processor's"
    pixel_diff = float((batch["media"]["image"] - inputs["pixel_values"][0]).abs().max())
    assert pixel_diff == 0.0, f"pixels differ from the IDEFICS processor's by {pixel_diff}"
    with torch.no_grad():
        want = hf(**inputs).logits
    got = logits(model, batch)
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = float((got - want).abs().max())
    assert diff <= LOGIT_TOL, f"{config} {case}: logits max abs diff {diff:.3g} > {LOGIT_TOL}"
    if case.startswith("eos"):  # the reset is what makes them equal
        inj = model.injectors["xattn"]
        inj.config = inj.config.model_copy(update={"reset_token": None})
        without = float((logits(model, batch) - want).abs().max())
        inj.config = inj.config.model_copy(update={"reset_token": "</s>"})
        assert without > 100 * LOGIT_TOL, f"{case}: attending past </s> changes nothing ({without:.3g})"
    # the images matter: other pixels move the logits far more than the tolerance
    flipped = logits(model, {**batch, "media": {"image": batch["media"]["image"].flip(-1)}})
    assert float((flipped - got).abs().max()) > 100 * LOGIT_TOL, "the images do not reach the logits"
    with torch.no_grad():
        theirs = hf.generate(**inputs, max_new_tokens=16, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    ours = model.generate([text], [{"image": used}], max_new_tokens=16)[0].token_ids
    eos = hf.generation_config.eos_token_id
    theirs = theirs[: theirs.index(eos)] if eos in theirs else theirs
    assert ours == theirs, f"{config} {case}: greedy tokens differ: mmhub {ours} vs transformers {theirs}"
    assert len(ours) == 16 and len(set(ours)) > 1, f"{config} {case}: reply {ours} too short or degenerate"


def test_a_padded_batch_of_one_and_two_images_equals_transformers(folder: Any) -> None:
    """Two prompts in one batch (one image / two images, right-padded): IDEFICS pads the missing image with zeros
    and masks it; mmhub's per-sample items do the same. Logits agree at every real position."""
    from mmhub.importers import import_checkpoint

    hf, processor = reference(folder)
    model = import_checkpoint(folder)
    prompts, texts, used = zip(*(prompt_for(c) for c in ("one_image", "two_interleaved")), strict=True)
    inputs = processor(text=list(prompts), return_tensors="pt")
    batch = model.batch(list(texts), [{"image": u} for u in used])
    assert batch["input_ids"].tolist() == inputs["input_ids"].tolist(), "token ids differ from the processor's"
    with torch.no_grad():
        want = hf(**inputs).logits
    got = logits(model, batch)
    real = inputs["attention_mask"].bool()
    diff = float((got - want)[real].abs().max())
    assert diff <= LOGIT_TOL, f"batched: logits max abs diff {diff:.3g} > {LOGIT_TOL} at real positions"


@pytest.mark.parametrize("config", ["base", "variant"])
def test_export_reloads_in_transformers_with_identical_logits(request: Any, tmp_path: Any, config: str) -> None:
    """import -> export -> IdeficsForVisionText2Text + AutoProcessor from the written folder: the same inputs and
    exactly the original checkpoint's logits (the decoupled tables split back at the same row)."""
    from mmhub.importers import import_checkpoint
    from mmhub.importers.idefics import IdeficsImporter

    folder = request.getfixturevalue("folder" if config == "base" else "variant_folder")
    hf, processor = reference(folder)
    out = IdeficsImporter().export(import_checkpoint(folder), tmp_path / "exported")
    again, again_processor = reference(out)
    assert again.config.additional_vocab_size == 2 and again.config.vocab_size == 261
    prompt, _, _ = prompt_for("two_interleaved")
    inputs = processor(text=[prompt], return_tensors="pt")
    inputs_again = again_processor(text=[prompt], return_tensors="pt")
    assert all(torch.equal(inputs[k], inputs_again[k]) for k in inputs), "the exported processor differs"
    with torch.no_grad():
        want, got = hf(**inputs).logits, again(**inputs).logits
    diff = float((got - want).abs().max())
    assert diff == 0.0, f"{config}: exported folder's logits differ from the original's by {diff:.3g}"


def test_export_refuses_a_model_without_idefics_shape(folder: Any, tmp_path: Any) -> None:
    from mmhub.errors import ExportError
    from mmhub.importers import import_checkpoint
    from mmhub.importers.idefics import IdeficsImporter

    model = import_checkpoint(folder)
    model.encoders["image"].config = model.encoders["image"].config.model_copy(update={"drop_cls": True})
    with pytest.raises(ExportError, match="drop_cls True"):
        IdeficsImporter().export(model, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_template_plain_takes_the_processor_text_verbatim(folder: Any) -> None:
    from mmhub.importers import import_checkpoint

    _, processor = reference(folder)
    model = import_checkpoint(folder, template="plain")
    prompt, _, used = prompt_for("two_in_a_row")
    text = f"<s>User:{FAKE}{IMAGE}{FAKE}{IMAGE}{FAKE}Compare them.\nAssistant:"
    assert model.batch([text], [{"image": used}])["input_ids"].tolist() == \
        processor(text=[prompt], return_tensors="pt")["input_ids"].tolist()


def test_validation_names_a_resampler_width_the_injector_does_not_take(folder: Any) -> None:
    """The idefics perceiver emits the vision width; an injector reading LM-wide context cannot take it."""
    from mmhub.assembly import build
    from mmhub.errors import SpecError
    from mmhub.importers import import_checkpoint

    spec = import_checkpoint(folder).spec.model_dump(exclude_none=True)
    xattn = spec["injectors"]["xattn"]
    for key in ("kv_dim", "ff_dim", "activation", "norm_eps", "qk_norm", "gate"):
        xattn.pop(key)
    xattn["layout"] = "flamingo"
    with pytest.raises(SpecError, match=rf"projectors.image: perceiver layout idefics: out_dim {HIDDEN} != in_dim "
                                        rf"{VISION}.*kv_dim: {VISION}"):
        build(spec)


def test_a_bfloat16_backbone_runs_with_float32_gated_layers(folder: Any) -> None:
    """dtype bfloat16 is the LM's; the gated layers compute in their float32 and hand bfloat16 back to the blocks."""
    from mmhub.importers import import_checkpoint

    half, full = import_checkpoint(folder, dtype="bfloat16"), import_checkpoint(folder)
    _, text, used = prompt_for("two_interleaved")
    batch = full.batch([text], [{"image": used}])
    got, want = logits(half, batch), logits(full, batch)
    assert got.dtype == torch.bfloat16
    diff = float((got.float() - want).abs().max())
    assert diff < 0.3, f"bfloat16 logits are {diff:.3g} from float32's (scale {float(want.abs().max()):.3g})"


def test_saved_import_reloads_on_its_own(folder: Any, tmp_path: Any) -> None:
    """Every weight is in the saved folder (no source: in the spec; the tokenizer is still read from the checkpoint
    folder, which the reload is allowed to read): the reload computes the same logits."""
    import mmhub
    from mmhub.importers import import_checkpoint

    model = import_checkpoint(folder)
    _, text, used = prompt_for("two_interleaved")
    batch = model.batch([text], [{"image": used}])
    model.save_pretrained(tmp_path / "saved")
    again = mmhub.load(tmp_path / "saved", allow_paths=[str(folder)])
    assert torch.equal(logits(again, batch), logits(model, batch))


def test_swap_the_llama_for_a_qwen2_and_train_a_step(folder: Any) -> None:
    """The imported parts are ordinary mmhub components: the LLaMA swapped for a tiny Qwen2 of the same width keeps
    the imported tower, resampler and gated cross-attention layers, and one training step moves the gates."""
    from mmhub.assembly import build
    from mmhub.importers import import_checkpoint

    imported = import_checkpoint(folder)
    spec = imported.spec.model_dump(exclude_none=True)
    spec["backbone"] = {"type": "hf_causal_lm", "tokenizer": str(folder), "config": {
        "model_type": "qwen2", "hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 263, "max_position_embeddings": 128}}
    model = build(spec)
    for part in ("encoders", "projectors", "injectors"):
        getattr(model, part).load_state_dict(getattr(imported, part).state_dict())
    _, text, used = prompt_for("one_image")
    batch = model.batch([[{"role": "user", "content": text}, {"role": "assistant", "content": "A picture."}]],
                        [{"image": used}])
    model.train()
    model.projectors.requires_grad_(True)  # what a stage training the projector and the gated layers unfreezes
    model.injectors.requires_grad_(True)
    gate = model.injectors["xattn"].layers[0].attn_gate
    before = gate.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, gate.detach())
    assert type(model.backbone.model).__name__ == "Qwen2ForCausalLM"
