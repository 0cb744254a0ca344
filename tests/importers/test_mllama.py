"""Llama-3.2-Vision (mllama) in mmhub: the ``mllama_xattn`` injector's layer against transformers'
MllamaCrossAttentionDecoderLayer under the processor's cross-attention masks, the ``mllama_vision`` encoder (tiling
and tower) against MllamaImageProcessor + MllamaVisionModel, and the ``mllama`` importer's logits and greedy
generation against MllamaForConditionalGeneration through the family's own processor."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mmhub.backbones.mllama_xattn import MllamaXAttnLayer, key_mask
from mmhub.encoders.mllama_vision import MllamaVisionEncoder
from mmhub.interfaces import BuildContext

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_global_layers": 2,
          "attention_heads": 2, "image_size": 28, "patch_size": 14, "max_num_tiles": 4,
          "intermediate_layers_indices": [0, 2], "vision_output_dim": 96}
TEXT = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "hidden_size": 48, "intermediate_size": 96,
        "num_hidden_layers": 5, "num_attention_heads": 4,
        "num_key_value_heads": 2, "cross_attention_layers": [1, 4], "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
LAYER_TOL = 1e-5
FEATURE_TOL = 1e-5
MEASURED: dict[str, float] = {}


def picture(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def perturb(module: torch.nn.Module, std: float, seed: int = 0) -> None:
    """Move every weight away from its initialisation (gates included), so that equal outputs mean equal maths."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


def dense_cross_mask(ids: list[list[int]], image_id: int, tiles: list[list[int]], max_tiles: int) -> torch.Tensor:
    """The processor's (B, L, M, max_tiles) cross-attention mask, by transformers' own functions."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    sparse = [get_cross_attention_token_mask(row, image_id) for row in ids]
    return torch.from_numpy(convert_sparse_cross_attention_mask_to_dense(sparse, tiles, max_tiles, len(ids[0])))


@pytest.mark.parametrize("case", ["two_runs", "one_image_per_row"])
def test_xattn_layer_equals_transformers_cross_attention_layer(case: str) -> None:
    from transformers import MllamaTextConfig
    from transformers.models.mllama.modeling_mllama import (
        MllamaCrossAttentionDecoderLayer,
        _prepare_cross_attention_mask,
    )

    cfg = MllamaTextConfig(**TEXT, vocab_size=300)
    theirs = MllamaCrossAttentionDecoderLayer(cfg, layer_idx=1).eval()
    perturb(theirs, 0.3)
    ours = MllamaXAttnLayer(48, 4, 2, 96, 1e-5, "silu").eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    image, P, max_tiles = 299, 5, 4
    if case == "two_runs":  # text before the first image, two consecutive images, later a third
        ids = [[1, 2, image, image, 5, 6, 7, image, 8, 9], [1, image, 3, 4, 5, image, image, 6, 7, 8]]
        tiles = [[2, 4, 1], [3, 1, 2]]
    else:
        ids = [[1, 2, 3, image, 5, 6, 7], [image, 4, 5, 6, 7, 8, 9]]
        tiles = [[4], [1]]
    B, L, M = len(ids), len(ids[0]), len(tiles[0])
    torch.manual_seed(1)
    x = torch.randn(B, L, 48)
    states = torch.randn(B, M * max_tiles * P, 48)
    dense = dense_cross_mask(ids, image, tiles, max_tiles)
    mask4, full_row = _prepare_cross_attention_mask(dense, num_vision_tokens=P, dtype=torch.float32)
    ids_t = torch.tensor(ids)
    index = (ids_t == image).long().cumsum(1) - 1
    valid = torch.ones(B, M, dtype=torch.bool)
    real = torch.arange(max_tiles)[None, None] < torch.tensor(tiles)[..., None]  # (B, M, tiles)
    allowed = key_mask(index, valid, real.repeat_interleave(P, dim=2), max_tiles * P)
    assert torch.equal(allowed, dense.bool().repeat_interleave(P, dim=3).flatten(2)), "key masks differ"
    with torch.no_grad():
        want = theirs(x, cross_attention_states=states, cross_attention_mask=mask4, attention_mask=None,
                      full_text_row_masked_out_mask=full_row)
        got = ours(x, states, allowed)
    diff = float((want - got).abs().max())
    MEASURED[f"xattn_layer_{case}"] = diff
    assert diff <= LAYER_TOL, f"{case}: cross-attention layer differs from transformers' by {diff:.2e} (> {LAYER_TOL})"


def tiny_encoder() -> tuple[MllamaVisionEncoder, Any]:
    from transformers import MllamaVisionConfig, MllamaVisionModel

    tower = MllamaVisionModel(MllamaVisionConfig(**VISION)).eval()
    perturb(tower, 0.2)
    enc = MllamaVisionEncoder(MllamaVisionEncoder.Config.model_validate({"config": VISION}),
                              BuildContext(resolve=lambda uri: uri)).eval()
    enc.model.load_state_dict(tower.state_dict(), strict=True)
    return enc, tower


def test_encoder_equals_image_processor_and_vision_model() -> None:
    from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor

    enc, tower = tiny_encoder()
    processor = MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=4)
    # 1x1, 1x2 (wide), 2x1 (tall, downscaled), 2x2 (upscaled) canvases
    sizes = [(20, 20), (30, 61), (90, 40), (41, 43)]
    images = [picture(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    inputs = processor(images=[[im] for im in images], return_tensors="pt")
    items = torch.stack([enc.preprocess(im, "image") for im in images])
    pixel_diff = float((items[:, :, :3] - inputs["pixel_values"][:, 0]).abs().max())
    assert pixel_diff < 1e-6, f"pixel values differ from MllamaImageProcessor's by {pixel_diff}"
    assert torch.equal(items[:, 0, 3, 0, 0].long(), inputs["aspect_ratio_ids"][:, 0]), inputs["aspect_ratio_ids"]
    mask = enc.token_mask(items, "image").view(4, 4, -1)[..., 0]
    assert torch.equal(mask.long(), inputs["aspect_ratio_mask"][:, 0]), (mask, inputs["aspect_ratio_mask"])
    with torch.no_grad():
        want = tower(pixel_values=inputs["pixel_values"], aspect_ratio_ids=inputs["aspect_ratio_ids"],
                     aspect_ratio_mask=inputs["aspect_ratio_mask"]).last_hidden_state
        got = enc(items, "image")
    assert got.shape == (4, 4 * 5, 96), got.shape
    diff = float((want.reshape(4, 20, 96) - got).abs().max())
    MEASURED["vision_features"] = diff
    assert diff <= FEATURE_TOL, f"vision features differ from MllamaVisionModel's by {diff:.2e} (> {FEATURE_TOL})"


CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
LOGIT_TOL = 1e-4


def tiny_tokenizer() -> Any:
    """The byte tokenizer with Llama-3's special tokens; <|image|> last, so its id is the text vocab size (the first
    of the embedding table's extra rows, as in Llama-3.2-Vision)."""
    from mmhub.backbones.byte_tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_tokens(["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|python_tag|>", "<|image|>"], special_tokens=True)
    tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tok.chat_template = CHAT
    return tok


def save_checkpoint(folder: Any, text_overrides: dict[str, Any] | None = None, seed: int = 0) -> Any:
    """A tiny random Llama-3.2-Vision saved by transformers with its processor (weights and gates perturbed)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor

    tok = tiny_tokenizer()
    image_id = tok.convert_tokens_to_ids("<|image|>")
    text = {**TEXT, "vocab_size": image_id, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, **(text_overrides or {})}
    cfg = MllamaConfig(vision_config=VISION, text_config=text, image_token_index=image_id)
    model = MllamaForConditionalGeneration(cfg).eval()
    perturb(model, 0.08, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:  # tanh gates well away from 0, so every gated branch counts
                p.uniform_(0.5, 1.0)
            elif "norm" in name and name.endswith("weight"):  # norms near 1 keep the signal alive through the stack
                p.uniform_(0.8, 1.2)
        model.lm_head.weight.normal_(0, 1.0)  # logits of order 1, so a 1e-4 tolerance is tight
    model.save_pretrained(folder)
    processor = MllamaProcessor(image_processor=MllamaImageProcessor(size={"height": 28, "width": 28},
                                                                     max_image_tiles=4), tokenizer=tok)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return save_checkpoint(tmp_path_factory.mktemp("mllama"))


def test_import_matches_transformers_logits_and_greedy_tokens(checkpoint: Any) -> None:
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    from mmhub.importers.run import import_checkpoint

    model = import_checkpoint(checkpoint)
    hf = MllamaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    assert model.spec.injectors and model.plan.context_modalities == {"image": "xattn"}
    # equal image counts per sample: transformers pads a shorter sample's image slots with a blank image's features
    conversations = [[{"role": "user", "content": "<|image|><|image|>Describe both."}],
                     [{"role": "user", "content": "First <|image|> then <|image|>: which is brighter?"}]]
    images = [[picture(30, 61, 0), picture(20, 20, 1)], [picture(90, 40, 2), picture(41, 43, 3)]]  # 2, 1, 2, 4 tiles
    texts = [processor.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
             for c in conversations]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    batch = model.batch(conversations, [{"image": ims} for ims in images], add_generation_prompt=True)
    real = inputs["attention_mask"].bool()
    for row in range(2):
        assert batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist() == \
            inputs["input_ids"][row][real[row]].tolist(), f"row {row}: mmhub's prompt ids differ from the processor's"
    with torch.no_grad():
        theirs = hf(**inputs).logits
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     media=batch["media"]).logits
    diffs = [float((ours[r][batch["attention_mask"][r].bool()] - theirs[r][real[r]]).abs().max()) for r in range(2)]
    MEASURED["logits"] = max(diffs)
    assert max(diffs) <= LOGIT_TOL, f"logits differ from transformers' by {diffs} at the real positions (> {LOGIT_TOL})"

    prompt = [{"role": "user", "content": "<|image|>What is in this picture?"}]
    image = picture(30, 61, 4)
    reply = model.generate([prompt], [{"image": [image]}], max_new_tokens=16)[0]
    one = processor(images=[[image]], text=[processor.tokenizer.apply_chat_template(prompt, tokenize=False,
                                                                                      add_generation_prompt=True)],
                    return_tensors="pt")
    stops = model.stop_token_ids()
    with torch.no_grad():
        out = hf.generate(**one, max_new_tokens=16, do_sample=False, eos_token_id=stops,
                          pad_token_id=processor.tokenizer.pad_token_id)
    want = out[0, one["input_ids"].shape[1]:].tolist()
    want = want[:next((i for i, t in enumerate(want) if t in stops), len(want))]
    assert reply.token_ids == want, f"greedy tokens differ: mmhub {reply.token_ids} vs transformers {want}"
    assert len(want) == 16, f"transformers stopped after {len(want)} tokens; the check wants 16 (reseed the weights)"


def test_swap_the_imported_llm_and_train_one_step(checkpoint: Any) -> None:
    """The imported parts are plain mmhub parts: behind the imported tower, projector and cross-attention blocks put
    another Llama (3 self-attention layers, a different MLP width; random), and one optimiser step trains the
    cross-attention blocks while the imported tower and projector compute exactly as before."""
    from mmhub import build
    from mmhub.importers import Checkpoint, ImportOptions, import_checkpoint, load_strict
    from mmhub.importers.mllama import MllamaImporter
    from mmhub.train.trainable import apply_stage

    imported = import_checkpoint(checkpoint)
    parts = MllamaImporter().convert(Checkpoint(checkpoint), ImportOptions())
    spec = parts.spec
    spec["backbone"]["config"] = {**spec["backbone"]["config"], "num_hidden_layers": 3, "intermediate_size": 64}
    spec["stages"] = [{"name": "xattn", "train": {"injectors": "full"}}]
    model = build(spec)
    for path in ("encoders.image.model", "projectors.image", "injectors.xattn"):
        load_strict(model.get_submodule(path), parts.weights[path], path)
    conversation = [{"role": "user", "content": "<|image|>What is this?"}, {"role": "assistant", "content": "tiles"}]
    image = picture(30, 61, 5)
    batch = model.batch([conversation], [{"image": [image]}])
    with torch.no_grad():
        ref = imported.encode_media(batch["media"])[0]["image"]
        got = model.encode_media(batch["media"])[0]["image"]
    assert float((ref - got).abs().max()) == 0.0
    plan = apply_stage(model, model.spec.stages[0])
    assert {k for k, n in plan.trainable.items() if n} == {"injectors.xattn"}, plan.trainable
    gate = model.injectors["xattn"].layers[0].cross_attn_attn_gate
    before = gate.detach().clone()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, gate.detach()), "the cross-attention gate did not train"


def test_imported_model_saves_every_weight_and_reloads_alone(checkpoint: Any, tmp_path: Any) -> None:
    import mmhub
    from mmhub.importers import import_checkpoint

    model = import_checkpoint(checkpoint)
    conversation = [{"role": "user", "content": "<|image|><|image|>Two pictures."}]
    batch = model.batch([conversation], [{"image": [picture(20, 20, 6), picture(90, 40, 7)]}])
    out = model.save_pretrained(tmp_path / "saved")
    again = mmhub.load(str(out), allow_paths=[str(checkpoint)])  # its tokenizer stays in the checkpoint folder
    with torch.no_grad():
        want = model(**batch).logits
        got = again(**batch).logits
    assert float((want - got).abs().max()) == 0.0


def test_export_reloads_in_transformers_with_identical_logits(checkpoint: Any, tmp_path: Any) -> None:
    """import -> train the cross-attention gates a little (so the export is not the checkpoint copied) -> export ->
    transformers reload: logits equal mmhub's through the exported folder's own processor."""
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    from mmhub.importers import import_checkpoint
    from mmhub.importers.mllama import MllamaImporter

    model = import_checkpoint(checkpoint)
    with torch.no_grad():
        for layer in model.injectors["xattn"].layers:
            layer.cross_attn_attn_gate.add_(0.25)
    out = MllamaImporter().export(model, tmp_path / "exported")
    hf = MllamaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    conversation = [{"role": "user", "content": "<|image|>Name the colours."}]
    image = picture(41, 43, 8)
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    inputs = processor(images=[[image]], text=[text], return_tensors="pt")
    batch = model.batch([conversation], [{"image": [image]}], add_generation_prompt=True)
    assert batch["input_ids"].tolist() == inputs["input_ids"].tolist()
    with torch.no_grad():
        diff = float((hf(**inputs).logits - model(**batch).logits).abs().max())
    MEASURED["export_logits"] = diff
    assert diff <= LOGIT_TOL, f"exported folder's logits differ from mmhub's by {diff:.2e} (> {LOGIT_TOL})"


def test_batched_and_text_only_generation_match_transformers(checkpoint: Any) -> None:
    """A batch of a 1-image and a 2-image prompt gives each row what transformers gives it alone (logits and greedy
    tokens), a left-padded batch of two 2-image prompts of different lengths generates transformers' batched greedy
    tokens, and a text-only prompt (transformers skips the cross-attention layers) gives its logits and tokens."""
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    from mmhub.importers import import_checkpoint

    model = import_checkpoint(checkpoint)
    hf = MllamaForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    stops = model.stop_token_ids()

    def theirs(conversations: list[Any], images: list[Any] | None) -> list[list[int]]:
        texts = [processor.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations]
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=stops,
                              pad_token_id=processor.tokenizer.pad_token_id)
        rows = [r[inputs["input_ids"].shape[1]:].tolist() for r in out]
        return [r[:next((i for i, t in enumerate(r) if t in stops), len(r))] for r in rows]

    conversations = [[{"role": "user", "content": "<|image|>What is it?"}],
                     [{"role": "user", "content": "Look: <|image|> and <|image|>. Which one is wider, and why?"}]]
    images = [[picture(30, 61, 10)], [picture(20, 20, 11), picture(90, 40, 12)]]
    # 1 and 2 images in one batch: transformers would fill the first row's missing slot with a blank image's
    # features (its tokens before the image attend to them), so each row is compared with transformers alone
    alone = [theirs([conv], [ims])[0] for conv, ims in zip(conversations, images, strict=True)]
    ours = [r.token_ids for r in model.generate(conversations, [{"image": ims} for ims in images], max_new_tokens=16)]
    assert ours == alone, "mixed-count batch: greedy tokens differ from transformers' per sample"
    batch = model.batch(conversations, [{"image": ims} for ims in images])
    with torch.no_grad():
        logits = model(**batch).logits
        for row, (conv, ims) in enumerate(zip(conversations, images, strict=True)):
            text = processor.tokenizer.apply_chat_template(conv, tokenize=False)
            want = hf(**processor(images=[ims], text=[text], return_tensors="pt")).logits[0]
            got = logits[row][batch["attention_mask"][row].bool()]
            diff = float((want - got).abs().max())
            MEASURED[f"mixed_batch_row{row}_logits"] = diff
            assert diff <= LOGIT_TOL, f"mixed-count batch row {row}: logits differ from transformers' alone by {diff}"
    pair = [conversations[1], [{"role": "user", "content": "<|image|>Then <|image|>?"}]]
    pair_images = [images[1], [picture(41, 43, 13), picture(30, 61, 14)]]
    ours = [r.token_ids for r in model.generate(pair, [{"image": ims} for ims in pair_images], max_new_tokens=16)]
    assert ours == theirs(pair, pair_images), "batched (left-padded) greedy tokens differ"

    text_only = [{"role": "user", "content": "No picture here."}]
    batch = model.batch([text_only], None, add_generation_prompt=True)
    with torch.no_grad():
        diff = float((model(**batch).logits - hf(input_ids=batch["input_ids"]).logits).abs().max())
    MEASURED["text_only_logits"] = diff
    assert diff <= LOGIT_TOL, f"text-only logits differ by {diff:.2e}"
    assert model.generate([text_only], max_new_tokens=16)[0].token_ids == theirs([text_only], None)[0]


@pytest.mark.parametrize("layers", [[0, 2, 3], [4]])
def test_cross_layers_anywhere_in_the_stack(layers: list[int], tmp_path: Any) -> None:
    """Cross-attention layers first, consecutive (one hook runs two blocks) or last (after the final self layer):
    the imported model's logits equal transformers'."""
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    from mmhub.importers import import_checkpoint

    folder = save_checkpoint(tmp_path / "ckpt", {"cross_attention_layers": layers}, seed=3)
    model = import_checkpoint(folder)
    hf = MllamaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    conversation = [{"role": "user", "content": "<|image|>Tell me."}]
    image = picture(90, 40, 15)
    text = processor.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    batch = model.batch([conversation], [{"image": [image]}], add_generation_prompt=True)
    with torch.no_grad():
        want = hf(**processor(images=[[image]], text=[text], return_tensors="pt")).logits
        diff = float((want - model(**batch).logits).abs().max())
    MEASURED[f"layers_{layers}_logits"] = diff
    assert diff <= LOGIT_TOL, f"cross layers {layers}: logits differ from transformers' by {diff:.2e}"


def test_both_key_layouts_import_the_same(checkpoint: Any, tmp_path: Any) -> None:
    """transformers 5 saves Mllama under the older names (vision_model., language_model.model.,
    language_model.lm_head., multi_modal_projector.) and loads both; the same tensors under the in-memory names
    (model.vision_model., model.language_model., model.multi_modal_projector., lm_head.) import to the same model."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mmhub.importers import import_checkpoint

    other = tmp_path / "other-layout"
    shutil.copytree(checkpoint, other)
    older_to_current = {"vision_model.": "model.vision_model.", "language_model.model.": "model.language_model.",
                        "multi_modal_projector.": "model.multi_modal_projector.", "language_model.lm_head.": "lm_head."}
    state = load_file(str(other / "model.safetensors"))
    saved_older = any(k.startswith("language_model.model.") for k in state)
    renames = older_to_current if saved_older else {v: k for k, v in older_to_current.items()}
    moved = {}
    for key, value in state.items():
        prefix = next(p for p in renames if key.startswith(p))
        moved[renames[prefix] + key[len(prefix):]] = value
    save_file(moved, str(other / "model.safetensors"), metadata={"format": "pt"})
    a, b = import_checkpoint(checkpoint), import_checkpoint(other)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_processor_mllama_vision_cannot_follow_is_refused_by_name(checkpoint: Any, tmp_path: Any) -> None:
    import json
    import shutil

    from mmhub.errors import CheckpointError
    from mmhub.importers import import_checkpoint

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    cfg = json.loads((bad / "processor_config.json").read_text())
    cfg["image_processor"].update(max_image_tiles=2, resample=3)
    (bad / "processor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"max_image_tiles 2 != the tower's max_num_tiles 4.*resample 3"):
        import_checkpoint(bad)


def test_placeholder_ids_past_the_table_pass_validation_other_extra_tokens_do_not() -> None:
    """A placeholder may lie past the embedding table (Mllama's <|image|> is row vocab_size of the injector's extra
    rows); any other token past it, or a placeholder that is an ordinary token, is still refused."""
    from mmhub import build
    from mmhub.errors import SpecError

    def spec(vocab: int, placeholder: str) -> dict[str, Any]:
        llama = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab,
                 "max_position_embeddings": 128, "pad_token_id": 0}
        return {"name": "xattn", "encoders": {"image": {"type": "mllama_vision",
                                                        **MllamaVisionEncoder.example_settings}},
                "projectors": {"image": {"type": "linear"}},
                "backbone": {"type": "hf_causal_lm", "config": llama, "tokenizer": "byte"},
                "injectors": {"x": {"type": "mllama_xattn", "layers": [1], "heads": 4, "kv_heads": 2,
                                    "intermediate_size": 64}},
                "template": "plain", "placeholders": {"image": placeholder}}

    model = build(spec(261, "<|image|>"))  # the byte tokenizer's 261 tokens, the placeholder added as id 261
    assert model.processor.placeholder_ids["image"] == 261
    with pytest.raises(SpecError, match=r"tokenizer has 261 tokens > the model's vocabulary size 260"):
        build(spec(260, "<|image|>"))
    with pytest.raises(SpecError, match=r"placeholder 'a' is an ordinary token"):
        build(spec(261, "a"))
