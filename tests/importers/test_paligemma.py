"""PaliGemma import: a tiny random PaliGemma written by transformers (with its processor) imports as hf_vision ->
linear -> Gemma with prefix-LM attention, and matches transformers on the processor's own inputs: logits at every
real position, greedy tokens; the prefix-LM mask is what makes them match; the imported LLM swaps out and trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

from mmhub import build
from mmhub.errors import MMHubError
from mmhub.importers import import_checkpoint
from mmhub.passes import prefix_lm_mask
from mmhub.splice import IGNORE

TOL = 1e-4
VISION = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "vision_use_head": False}
# the processor adds 1024 <locNNNN> and 128 <segNNN> tokens to the 262-token byte tokenizer: 1414 in all
TEXT = {"model_type": "gemma", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 1424,
        "max_position_embeddings": 256, "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
# PaliGemma 2: Gemma-2 (soft-capped attention and logits, sliding-window layers wider than these sequences)
GEMMA2 = {**TEXT, "model_type": "gemma2", "sliding_window": 128, "final_logit_softcapping": 30.0,
          "attn_logit_softcapping": 50.0}
# (text config, std of the random weights: Gemma-2's random models repeat one token at 0.2)
TEXTS = {"paligemma": (TEXT, 0.2), "paligemma2": (GEMMA2, 1.0)}
PROMPTS = ["<image>What is this?", "<image>caption en"]
ANSWERS = ["A cat.", "Two red squares on grey."]


def paligemma_folder(folder: Path, text: dict[str, Any] = TEXT, seed: int = 0, std: float = 0.2) -> Path:
    """A PaliGemma folder written by transformers: shrunk config, weights moved off their init, its processor."""
    from transformers import PaliGemmaConfig, PaliGemmaProcessor, SiglipImageProcessor

    from mmhub.backbones.byte_tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_special_tokens({"extra_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    config = PaliGemmaConfig(vision_config=VISION, text_config=text, projection_dim=32, hidden_size=32,
                             image_token_index=tok.convert_tokens_to_ids("<image>"), vocab_size=TEXT["vocab_size"])
    torch.manual_seed(seed)
    hf = PaliGemmaForConditionalGeneration(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, std)
    hf.save_pretrained(str(folder))
    PaliGemmaProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}, image_seq_length=16),
                       tokenizer=tok).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module", params=list(TEXTS))
def folder(request, tmp_path_factory) -> Path:
    text, std = TEXTS[request.param]
    return paligemma_folder(tmp_path_factory.mktemp(request.param) / "tiny", text, std=std)


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in ((40, 48, 3), (32, 32, 3))]


def reference(folder: Path) -> tuple[Any, Any]:
    # the PIL backend resizes as mmhub does, bit for bit (the torchvision one differs by up to a grey level)
    return (PaliGemmaForConditionalGeneration.from_pretrained(str(folder)).eval(),
            AutoProcessor.from_pretrained(str(folder), backend="pil"))


def logit_diff(model: Any, hf: Any, processor: Any, pictures: list[Image.Image]) -> float:
    """Max |mmhub - transformers| logit over every real position of a two-sample batch with answers (suffixes)."""
    theirs_in = processor(images=[[p] for p in pictures], text=PROMPTS, suffix=ANSWERS, padding="longest",
                          return_tensors="pt")
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in zip(PROMPTS, ANSWERS, strict=True)]
    ours_in = model.batch(convs, [{"image": [p]} for p in pictures])
    with torch.no_grad():
        out = model(**ours_in)
        theirs = hf(**{k: theirs_in[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids")})
    real = theirs_in["attention_mask"].bool()
    # the same sequence: processor ids == mmhub's spliced labels where labelled, and the same positions are labelled
    assert torch.equal(out.labels[:, :real.shape[1]] != IGNORE, theirs_in["token_type_ids"].bool() & real)
    assert torch.equal(out.labels[:, :real.shape[1]][real & (out.labels[:, :real.shape[1]] != IGNORE)],
                       theirs_in["input_ids"][real & theirs_in["token_type_ids"].bool()])
    return float((out.logits[:, :real.shape[1]][real] - theirs.logits[real]).abs().max())


def test_imported_paligemma_logits_equal_transformers(folder: Path, pictures) -> None:
    model = import_checkpoint(folder)
    assert model.imported_from["importer"] == "paligemma"
    spec = model.spec
    assert (spec.encoders["image"].type, spec.projectors["image"].type, spec.backbone.type) == (
        "hf_vision", "linear", "hf_causal_lm")
    assert model.backbone.prefix_lm and model.plan.tokens_per_item("image") == 16
    hf, processor = reference(folder)
    diff = logit_diff(model, hf, processor, pictures)
    assert diff <= TOL, f"{folder.parent.name}: max abs logit diff {diff:.3g} > {TOL}"
    print(f"{folder.parent.name} max abs logit diff {diff:.3g}")


def test_without_the_prefix_lm_mask_the_logits_differ(folder: Path, pictures) -> None:
    """The prefix-LM mask is what matches transformers: a causal-only import is far off (the parity test can fail)."""
    model = import_checkpoint(folder)
    causal = build(model.spec.model_dump(exclude_none=True) | {
        "backbone": {**model.spec.backbone.model_dump(exclude_none=True), "prefix_lm": False}})
    causal.load_state_dict(model.state_dict())
    hf, processor = reference(folder)
    assert logit_diff(causal.eval(), hf, processor, pictures) > 1e-2


def test_prefix_lm_mask_is_bidirectional_over_the_prompt_only() -> None:
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 7, 8, IGNORE], [IGNORE, IGNORE, IGNORE, IGNORE, 9, 9]])
    m = prefix_lm_mask(mask, labels)[:, 0]
    assert m.shape == (2, 6, 6)
    assert m[0, 0, 2] and m[0, 2, 0] and not m[0, 2, 3] and m[0, 3, 2] and not m[0, 3, 4] and m[0, 4, 3]
    assert not m[0, :, 5].any() or m[0, 5, 5]  # padding: attended by nobody but itself
    assert not m[0, :5, 5].any() and not m[1, 1:, 0].any()
    assert m[1, 1, 3] and not m[1, 3, 4]
    full = prefix_lm_mask(mask)[:, 0]  # no labels: the whole real row is the prompt
    assert full[0, :5, :5].all() and full[1, 1:, 1:].all()


def test_greedy_generation_equals_transformers(folder: Path, pictures) -> None:
    model = import_checkpoint(folder)
    hf, processor = reference(folder)
    for prompt, picture in zip(PROMPTS, pictures, strict=True):
        ours = model.generate([prompt], [{"image": [picture]}], max_new_tokens=16)[0].token_ids
        inputs = processor(images=[picture], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=16, do_sample=False)
        theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
        theirs = theirs[:theirs.index(TEXT["eos_token_id"])] if TEXT["eos_token_id"] in theirs else theirs
        assert ours == theirs, f"greedy tokens differ on {prompt!r}: mmhub {ours} vs transformers {theirs}"
        assert len(set(ours)) > 1, f"degenerate generation {ours}: the test would not see a wrong token"


def test_swap_the_llm_for_another_tiny_one_and_train_a_step(folder: Path, pictures) -> None:
    """The imported model is ordinary mmhub parts: its Gemma swapped for a tiny Llama (the projector re-sized to it,
    tower kept with its imported weights) trains one step, and the tower's weights are the imported ones."""
    imported = import_checkpoint(folder)
    spec = imported.spec.model_dump(exclude_none=True)
    spec["backbone"] = {"type": "hf_causal_lm", "tokenizer": "byte", "config": {
        "model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256}}
    spec["projectors"]["image"] = {"type": "linear"}
    model = build(spec)
    model.encoders.load_state_dict(imported.encoders.state_dict())
    batch = model.batch([[{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": ANSWERS[0]}]],
                        [{"image": [pictures[0]]}])
    model.train()
    before = model.projectors["image"].proj.weight.detach().clone()
    trained = list(model.projectors.parameters()) + list(model.backbone.parameters())  # tower frozen, as imported
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(trained, lr=0.1)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.projectors["image"].proj.weight)
    assert model.projectors["image"].proj.weight.shape == (48, 32)


def test_a_prefix_longer_than_the_sliding_window_is_refused(tmp_path, pictures) -> None:
    """Gemma-2's sliding-window layers would need a windowed prefix-LM mask, which mmhub does not build: refused."""
    model = import_checkpoint(paligemma_folder(tmp_path / "narrow", {**GEMMA2, "sliding_window": 8}))
    batch = model.batch([PROMPTS[0]], [{"image": [pictures[0]]}])
    with pytest.raises(MMHubError, match="exceed the gemma2 sliding window of 8"):
        model(**batch)


def test_export_reloads_in_transformers_with_the_same_logits(folder: Path, pictures, tmp_path) -> None:
    """import -> export -> transformers reload: the folder's own processor gives the same inputs and the reloaded model
    the original's logits; mmhub's import matches it as it matched the original."""
    from mmhub.importers.paligemma import PaliGemmaImporter

    model = import_checkpoint(folder)
    out = PaliGemmaImporter().export(model, tmp_path / "exported")
    assert not list(tmp_path.glob(".exported.*"))  # written through a temporary folder, nothing left behind
    original, processor = reference(folder)
    exported, exported_processor = reference(out)
    keys = ("input_ids", "attention_mask", "pixel_values", "token_type_ids")
    ours = processor(images=[[p] for p in pictures], text=PROMPTS, suffix=ANSWERS, padding="longest",
                     return_tensors="pt")
    theirs = exported_processor(images=[[p] for p in pictures], text=PROMPTS, suffix=ANSWERS, padding="longest",
                                return_tensors="pt")
    assert all(torch.equal(ours[k], theirs[k]) for k in keys)
    with torch.no_grad():
        diff = float((original(**{k: ours[k] for k in keys}).logits
                      - exported(**{k: ours[k] for k in keys}).logits).abs().max())
    assert diff <= TOL, f"{folder.parent.name}: exported vs original max abs logit diff {diff:.3g}"
    assert logit_diff(model, exported, exported_processor, pictures) <= TOL


def test_export_names_what_paligemma_has_no_place_for(folder: Path) -> None:
    from mmhub.errors import ExportError
    from mmhub.importers.paligemma import PaliGemmaImporter

    spec = import_checkpoint(folder).spec.model_dump(exclude_none=True)
    spec["projectors"]["image"] = {"type": "mlp", "depth": 2}
    spec["template"] = "plain"
    with pytest.raises(ExportError, match="projectors.image: mlp .*template 'plain'"):
        PaliGemmaImporter().export(build(spec), Path("unused"))


def test_saved_import_reloads_with_the_same_logits(folder: Path, pictures, tmp_path) -> None:
    """save_pretrained writes every weight (the imported spec has no source:) and the folder reloads on its own,
    reading the tokenizer from the checkpoint folder (a path outside it that the caller allows)."""
    import mmhub

    model = import_checkpoint(folder)
    out = model.save_pretrained(tmp_path / "saved")
    again = mmhub.load(str(out), allow_paths=[str(folder)]).eval()
    batch = model.batch(["<image>Is it red?"], [{"image": [pictures[0]]}])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)
