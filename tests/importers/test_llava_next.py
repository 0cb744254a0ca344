"""LLaVA-NeXT import: a tiny random LLaVA-NeXT written by transformers (with its processor) imports as
anyres(hf_vision CLIP) -> mlp (+ image_newline) -> Llama, and matches transformers through LlavaNextProcessor on
images of different aspect ratios (so different token counts): the same token sequence, logits at every real
position, greedy tokens. Also: AnyRes in front of another tower (open_clip) builds and trains one step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mmhub import build
from mmhub.importers import import_checkpoint

TOL = 1e-4
TILE = 32
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
CLIP = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": TILE, "patch_size": 8}
LLAMA = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 512,
         "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
CONVS = [[{"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": "A cat."}],
         [{"role": "user", "content": "Look: <image>\nAnd the colour?"}, {"role": "assistant", "content": "Red."}]]
PROMPTS = ["<image>\nWhat is this?", "Describe <image> briefly."]
SHAPES = ((40, 90, 3), (90, 40, 3))  # wide and tall: different grids, unpadding and token counts
MEASURED: dict[str, float] = {}


def tokenizer_with_image() -> Any:
    from mmhub.backbones.byte_tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_special_tokens({"extra_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    return tok


def vicuna_jinja(tok: Any) -> str:
    from mmhub.export.chat_template import jinja_template
    from mmhub.templates import resolve_template

    return jinja_template(resolve_template("vicuna_v1", tok), tok, "<image>")


def perturb(model: torch.nn.Module, std: float, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)


def llava_next_folder(folder: Path, seed: int = 0) -> Path:
    """A LLaVA-NeXT folder written by transformers: shrunk config, weights moved off their init, its processor."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = tokenizer_with_image()
    tok.chat_template = vicuna_jinja(tok)
    config = LlavaNextConfig(vision_config=CLIP, text_config=LLAMA, image_token_index=tok.convert_tokens_to_ids(
        "<image>"), image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2, projector_hidden_act="gelu",
        vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    hf = LlavaNextForConditionalGeneration(config)
    perturb(hf, 0.2, seed)
    hf.save_pretrained(str(folder))
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                              image_grid_pinpoints=PINPOINTS)
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=tok.chat_template).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return llava_next_folder(tmp_path_factory.mktemp("llava_next") / "tiny")


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in SHAPES]


def reference(folder: Path, cls_name: str = "LlavaNextForConditionalGeneration") -> tuple[Any, Any]:
    import transformers

    hf = getattr(transformers, cls_name).from_pretrained(str(folder)).eval()
    processor = transformers.AutoProcessor.from_pretrained(str(folder))  # its default (torchvision) backend
    processor.tokenizer.padding_side = "right"
    return hf, processor


def spliced_ids(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """mmhub's spliced sequence as token ids (each image token as the image id) and its attention mask."""
    sp = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], media=batch["media"])
    ids = batch["input_ids"].gather(1, sp.origin.clamp(min=0))
    return ids.masked_fill(sp.media_positions, model.processor.placeholder_ids["image"]), sp.attention_mask


def compare_logits(model: Any, hf: Any, processor: Any, pictures: list[Image.Image], convs: list[Any],
                   extra: tuple[str, ...] = ("image_sizes",)) -> float:
    """Max |mmhub - transformers| logit over every real position of a batch (one image per conversation), after
    checking both hold the same token sequence."""
    texts = [processor.apply_chat_template(c, tokenize=False) for c in convs]
    theirs_in = processor(images=pictures, text=texts, padding=True, return_tensors="pt")
    batch = model.batch(convs, [{"image": [p]} for p in pictures])
    ids, mask = spliced_ids(model, batch)
    real = theirs_in["attention_mask"].bool()
    assert ids.shape == theirs_in["input_ids"].shape and torch.equal(mask.bool(), real), (
        f"token counts differ: mmhub {mask.sum(1).tolist()} vs processor {real.sum(1).tolist()}")
    assert torch.equal(ids[real], theirs_in["input_ids"][real]), "the spliced sequence differs from the processor's"
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = hf(**{k: theirs_in[k] for k in ("input_ids", "attention_mask", "pixel_values", *extra)}).logits
    return float((ours[real] - theirs[real]).abs().max())


def greedy_pairs(model: Any, hf: Any, processor: Any, pictures: list[Image.Image], eos: int
                 ) -> list[tuple[list[int], list[int]]]:
    pairs = []
    for prompt, picture in zip(PROMPTS, pictures, strict=True):
        ours = model.generate([prompt], [{"image": [picture]}], max_new_tokens=16)[0].token_ids
        text = processor.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        inputs = processor(images=[picture], text=[text], return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=16, do_sample=False)
        theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
        theirs = theirs[:theirs.index(eos)] if eos in theirs else theirs
        pairs.append((ours, theirs))
    return pairs


def test_imported_llava_next_logits_equal_transformers(folder: Path, pictures) -> None:
    model = import_checkpoint(folder)
    assert model.imported_from["importer"] == "llava_next"
    spec = model.spec
    assert (spec.encoders["image"].type, spec.projectors["image"].type) == ("anyres", "mlp")
    assert model.plan.template.name == "vicuna_v1"
    hf, processor = reference(folder)
    counts = [int(model.encoders["image"].token_mask(model.encoders["image"].preprocess(p, "image")[None],
                                                     "image").sum()) for p in pictures]
    assert counts[0] != counts[1] or SHAPES[0] == SHAPES[1]
    # the budget counts the most any image takes: at least every image's own count
    assert model.plan.tokens_per_item("image") >= max(counts)
    diff = compare_logits(model, hf, processor, pictures, CONVS)
    MEASURED["llava_next logits"] = diff
    print(f"llava_next: image tokens {counts}, max abs logit diff {diff:.3g}")
    assert diff <= TOL, f"llava_next: max abs logit diff {diff:.3g} > {TOL} (image tokens {counts})"
    with torch.no_grad():  # the comparison sees the row ends: moving image_newline moves the logits
        model.projectors["image"].image_newline.add_(0.5)
    assert compare_logits(model, hf, processor, pictures, CONVS) > 1e-2


def test_saved_import_reloads_on_its_own(folder: Path, pictures, tmp_path) -> None:
    """save_pretrained writes every imported weight (tower, projector with image_newline, LLM): the folder reloads
    with the same logits."""
    from mmhub import load

    model = import_checkpoint(folder)
    batch = model.batch(CONVS, [{"image": [p]} for p in pictures])
    back = load(model.save_pretrained(tmp_path / "saved"), allow_paths=[str(folder)])  # its tokenizer is there
    assert back.spec.encoders["image"].type == "anyres"
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, back(**back.batch(CONVS, [{"image": [p]} for p in pictures])).logits)


def test_export_reloads_in_transformers_with_identical_logits(folder: Path, pictures, tmp_path) -> None:
    """import -> export (the family's folder: config, weights, processor) -> transformers -> the same logits as
    mmhub on the exported processor's inputs, and as the original checkpoint."""
    from mmhub.importers.run import find_importer

    model = import_checkpoint(folder)
    out = find_importer("llava_next", "test").export(model, tmp_path / "exported")
    hf, processor = reference(out)
    diff = compare_logits(model, hf, processor, pictures, CONVS)
    original, _ = reference(folder)
    same = all(torch.equal(a, b) for a, b in zip(hf.state_dict().values(), original.state_dict().values(),
                                                  strict=True))
    print(f"llava_next export: max abs logit diff {diff:.3g}")
    assert diff <= TOL and same, f"llava_next export: max abs logit diff {diff:.3g}, same weights {same}"


def test_greedy_generation_equals_transformers(folder: Path, pictures) -> None:
    model = import_checkpoint(folder)
    hf, processor = reference(folder)
    for ours, theirs in greedy_pairs(model, hf, processor, pictures, LLAMA["eos_token_id"]):
        assert ours == theirs, f"greedy tokens differ: mmhub {ours} vs transformers {theirs}"
        assert len(ours) == 16 and len(set(ours)) > 1, f"degenerate generation {ours}: the test would not see much"


@pytest.mark.parametrize("change, message", [
    ({"image_grid_pinpoints": [[32, 64], [64, 32]]}, r"image_grid_pinpoints \[\[32, 64\], \[64, 32\]\] differ"),
    ({"vision_feature_select_strategy": "full"}, r"vision_feature_select_strategy full on a CLIP tower"),
    ({"vision_feature_layer": [-2, -1]}, r"vision_feature_layer \[-2, -1\] \(several layers"),
])
def test_folders_mmhub_cannot_reproduce_are_refused_with_the_reason(folder: Path, tmp_path, change: dict,
                                                                    message: str) -> None:
    import json
    import shutil

    from mmhub.errors import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message):
        import_checkpoint(bad)


def test_anyres_in_front_of_another_tower_trains_a_step(folder: Path, pictures) -> None:
    """The imported model is ordinary mmhub parts: its AnyRes block around an open_clip tower instead of the CLIP one
    (the projector re-sized to it, a fresh image_newline) builds, splices each image at its own count and trains."""
    imported = import_checkpoint(folder)
    spec = imported.spec.model_dump(exclude_none=True)
    spec["encoders"]["image"]["tower"] = {
        "type": "open_clip", "arch": None, "embed_dim": 24,
        "vision_cfg": {"image_size": TILE, "patch_size": 8, "layers": 2, "width": 24, "head_width": 12}}
    spec["projectors"]["image"] = {"type": "mlp", "depth": 2, "newline": True}
    model = build(spec)
    model.backbone.load_state_dict(imported.backbone.state_dict())
    assert model.encoders["image"].out_dim == 24
    batch = model.batch(CONVS, [{"image": [p]} for p in pictures])
    model.train()
    trained = list(model.projectors.parameters()) + list(model.encoders.parameters())
    for p in trained:
        p.requires_grad_(True)
    before = model.projectors["image"].image_newline.detach().clone()
    optimizer = torch.optim.SGD(trained, lr=0.1)
    out = model(**batch)
    out.loss.backward()
    optimizer.step()
    assert torch.isfinite(out.loss)
    assert not torch.equal(before, model.projectors["image"].image_newline)  # the row ends were used and learn
    enc = model.encoders["image"]
    counts = [int(enc.token_mask(enc.preprocess(p, "image")[None], "image").sum()) for p in pictures]
    text = [len(model.processor.encode(c, {"image": [p]}, preprocess=False).input_ids) - 1
            for c, p in zip(CONVS, pictures, strict=True)]
    assert out.logits.shape[1] == max(c + t for c, t in zip(counts, text, strict=True))
