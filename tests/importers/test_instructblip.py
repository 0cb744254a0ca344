"""InstructBLIP: mmhub's instruction-aware qformer (layout blip2) computes transformers' InstructBLIP Q-Former from
the instruction text, and the `instructblip` import matches InstructBlipForConditionalGeneration."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, InstructBlipConfig, InstructBlipForConditionalGeneration

from mmhub import load
from mmhub.errors import CheckpointError
from mmhub.importers import import_checkpoint
from mmhub.importers.instructblip import InstructBlipImporter
from mmhub.interfaces import BuildContext, TextContext
from mmhub.projectors.qformer import QFormerProjector
from mmhub.projectors.qformer_blip2 import qformer_state
from mmhub.testing.tiny_blip import (
    QFORMER,
    QUERIES,
    T5,
    VISION,
    bert_tokenizer,
    greedy_pair,
    logit_diff,
    perturb,
    tiny_blip_folder,
)

COMPONENT_TOL = 1e-5
INSTRUCTIONS = ["What is in the image?", "how many red", "Describe this picture."]


def instructblip_projector(config: Any, tokenizer_folder: str, attention: str = "sdpa") -> QFormerProjector:
    q = config.qformer_config
    settings = {"layout": "blip2", "instruction_aware": True, "text_tokenizer": tokenizer_folder,
                "text_vocab_size": q.vocab_size, "text_positions": q.max_position_embeddings,
                "text_pad_id": q.pad_token_id, "num_queries": config.num_query_tokens, "layers": q.num_hidden_layers,
                "width": q.hidden_size, "heads": q.num_attention_heads,
                "cross_attention_every": q.cross_attention_frequency, "mlp_ratio": q.intermediate_size / q.hidden_size,
                "norm_eps": q.layer_norm_eps, "in_dim": q.encoder_hidden_size,
                "out_dim": config.text_config.d_model}
    return QFormerProjector(QFormerProjector.Config.model_validate(settings),
                            BuildContext(resolve=lambda uri: uri, attention=attention))


def test_instruction_aware_qformer_equals_transformers(tmp_path) -> None:
    qtok = bert_tokenizer()
    qtok.save_pretrained(tmp_path / "qtok")
    text = {k: v for k, v in T5.items() if k != "model_type"}
    config = InstructBlipConfig(vision_config=VISION, text_config={"model_type": "t5", **text},
                                qformer_config={**QFORMER, "vocab_size": len(qtok) + 3, "pad_token_id": 0},
                                num_query_tokens=QUERIES)
    torch.manual_seed(0)
    hf = InstructBlipForConditionalGeneration(config)
    perturb(hf, seed=3)
    hf.eval()
    proj = instructblip_projector(config, str(tmp_path / "qtok")).eval()
    state = qformer_state({k[len("qformer."):]: v for k, v in hf.state_dict().items() if k.startswith("qformer.")},
                          hf.query_tokens.detach(), text_ffn=True)
    proj.qformer.load_state_dict(state, strict=True)
    proj.proj.load_state_dict(hf.language_projection.state_dict(), strict=True)
    pixels = torch.randn(3, 3, VISION["image_size"], VISION["image_size"], generator=torch.Generator().manual_seed(4))
    enc = qtok(INSTRUCTIONS, padding=True, return_tensors="pt")  # right-padded, as InstructBlipProcessor does
    assert not bool(enc["attention_mask"].all()), "the batch should hold padding"
    with torch.no_grad():
        theirs = hf.get_image_features(pixels, qformer_input_ids=enc["input_ids"],
                                       qformer_attention_mask=enc["attention_mask"]).pooler_output
        features = hf.vision_model(pixels).last_hidden_state
        dummy = torch.zeros(3, 1, config.text_config.d_model)
        ctx = TextContext(dummy, torch.ones(3, 1, dtype=torch.bool), instruction_text=list(INSTRUCTIONS))
        ours = proj(features, ctx)
        other = proj(features, TextContext(dummy, ctx.instruction_mask, instruction_text=["a", "b", "c"]))
    diff = float((ours - theirs).abs().max())
    assert diff <= COMPONENT_TOL, f"InstructBLIP Q-Former + projection: max abs diff {diff:.3g} > {COMPONENT_TOL}"
    assert float((other - ours).abs().max()) > 1e-3, "the instruction does not change the query outputs"


# --- the instructblip importer against transformers' InstructBlipForConditionalGeneration ----------------------------
TOL = 1e-4
NEW_TOKENS = 16
PROMPTS = ["What is in the image?", "How many red squares? Describe this picture."]
ANSWERS = ["a red square", "two"]
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(6)
    return [Image.fromarray(rng.integers(0, 255, (VISION["image_size"],) * 2 + (3,), dtype=np.uint8))
            for _ in PROMPTS]


@pytest.fixture(scope="module", params=["t5", "opt", "llama"])
def imported(request, tmp_path_factory) -> tuple[str, Any, Any, Any]:
    folder = tiny_blip_folder(tmp_path_factory.mktemp(f"instructblip-{request.param}"), "instructblip",
                              request.param, seed=8)
    model = import_checkpoint(folder)
    hf = InstructBlipForConditionalGeneration.from_pretrained(folder).eval()
    return request.param, model, hf, AutoProcessor.from_pretrained(folder)


def test_instructblip_import_logits_equal_transformers(imported, pictures) -> None:
    lm, model, hf, processor = imported
    diff = logit_diff(model, hf, processor, pictures, PROMPTS, ANSWERS)
    MEASURED[f"instructblip-{lm}"] = diff
    assert diff <= TOL, f"instructblip ({lm}): max abs logit diff {diff:.3g} > {TOL}"
    assert model.imported_from["importer"] == "instructblip"
    assert model.projectors["image"].uses_text


def test_instructblip_import_greedy_generation_equals_transformers(imported, pictures) -> None:
    lm, model, hf, processor = imported
    ours, theirs = greedy_pair(model, hf, processor, pictures, PROMPTS, NEW_TOKENS)
    assert ours == theirs, f"instructblip ({lm}): greedy tokens differ: mmhub {ours} vs transformers {theirs}"
    assert all(len(row) >= NEW_TOKENS // 2 for row in ours), f"too few tokens generated to compare: {ours}"


def test_the_instruction_reaches_the_qformer(imported, pictures) -> None:
    """The same image under two instructions: the projected query tokens differ (the Q-Former read the text)."""
    _, model, _, _ = imported
    batch = model.batch([f"<image>{p}" for p in PROMPTS[:1] * 2], [{"image": [pictures[0]]}] * 2)
    other = model.batch([f"<image>{PROMPTS[1]}"], [{"image": [pictures[0]]}])
    with torch.no_grad():
        same = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], media=batch["media"])
        diff = model.prepare_inputs(other["input_ids"], other["attention_mask"], media=other["media"])
    q = QUERIES
    assert torch.equal(same.inputs_embeds[0, :q], same.inputs_embeds[1, :q])
    assert float((same.inputs_embeds[0, :q] - diff.inputs_embeds[0, :q]).abs().max()) > 1e-3


def test_saved_import_reloads_with_equal_logits(imported, pictures, tmp_path) -> None:
    """save_pretrained of the imported model writes every weight; the folder loads on its own with equal logits."""
    _, model, _, _ = imported
    model.save_pretrained(tmp_path / "saved")
    # the tokenizers stay in the checkpoint folder, which a loaded folder may read only when allowed
    again = load(tmp_path / "saved", allow_paths=[model.imported_from["folder"]])
    batch = model.batch([f"<image>{p}" for p in PROMPTS], [{"image": [im]} for im in pictures])
    with torch.no_grad():
        diff = float((model(**batch).logits - again(**batch).logits).abs().max())
    assert diff == 0.0, f"the reloaded import differs by {diff:.3g}"


def test_instructblip_export_reloads_in_transformers_with_equal_logits(imported, pictures, tmp_path) -> None:
    """mmhub -> transformers' InstructBLIP folder (with its Q-Former tokenizer) -> identical weights, equal logits."""
    lm, model, hf, _ = imported
    out = InstructBlipImporter().export(model, tmp_path / "exported")
    again = InstructBlipForConditionalGeneration.from_pretrained(out).eval()
    diff = logit_diff(model, again, AutoProcessor.from_pretrained(out), pictures, PROMPTS, ANSWERS)
    MEASURED[f"instructblip-{lm} export"] = diff
    assert diff <= TOL, f"instructblip ({lm}) export: max abs logit diff {diff:.3g} > {TOL}"
    ours, theirs = again.state_dict(), hf.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_instruction_aware_blip2_layout_needs_its_tokenizer(tmp_path) -> None:
    with pytest.raises(ValueError, match="text_tokenizer"):
        QFormerProjector.Config.model_validate({"layout": "blip2", "instruction_aware": True, "in_dim": 8,
                                                "out_dim": 8})
    folder = tiny_blip_folder(tmp_path / "ib", "instructblip", "t5", seed=1)
    import shutil

    shutil.rmtree(folder / "qformer_tokenizer")
    with pytest.raises(CheckpointError, match="qformer_tokenizer"):
        import_checkpoint(folder)


def test_report_measured_differences() -> None:
    print("\nmeasured:", {k: f"{v:.3g}" for k, v in MEASURED.items()})
