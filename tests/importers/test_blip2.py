"""BLIP-2: mmhub's qformer (layout blip2) computes transformers' Q-Former, and the `blip_2` import matches
transformers' Blip2ForConditionalGeneration (OPT and Flan-T5 backbones) in logits and greedy generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Blip2Config, Blip2ForConditionalGeneration

from mmhub.importers import import_checkpoint
from mmhub.interfaces import BuildContext
from mmhub.projectors.qformer import QFormerProjector
from mmhub.projectors.qformer_blip2 import qformer_state
from mmhub.testing.tiny_blip import OPT, QFORMER, QUERIES, VISION, first_stop, hf_ids, perturb, tiny_blip_folder

COMPONENT_TOL = 1e-5


def blip2_projector(config: Any, attention: str = "sdpa", **extra: Any) -> QFormerProjector:
    """An mmhub qformer (layout blip2) shaped like `config`'s Q-Former + language projection."""
    q = config.qformer_config
    settings = {"layout": "blip2", "num_queries": config.num_query_tokens, "layers": q.num_hidden_layers,
                "width": q.hidden_size, "heads": q.num_attention_heads,
                "cross_attention_every": q.cross_attention_frequency, "mlp_ratio": q.intermediate_size / q.hidden_size,
                "norm_eps": q.layer_norm_eps, "in_dim": q.encoder_hidden_size,
                "out_dim": config.text_config.hidden_size, **extra}
    return QFormerProjector(QFormerProjector.Config.model_validate(settings),
                            BuildContext(resolve=lambda uri: uri, attention=attention))


def test_qformer_blip2_layout_equals_transformers_qformer() -> None:
    text = {k: v for k, v in OPT.items() if k != "model_type"}
    config = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config={"model_type": "opt", **text},
                         num_query_tokens=QUERIES)
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(config)
    perturb(hf, seed=1)
    hf.eval()
    proj = blip2_projector(config).eval()
    state = qformer_state({k[len("qformer."):]: v for k, v in hf.state_dict().items() if k.startswith("qformer.")},
                          hf.query_tokens.detach(), text_ffn=False)
    proj.qformer.load_state_dict(state, strict=True)
    proj.proj.load_state_dict(hf.language_projection.state_dict(), strict=True)
    pixels = torch.randn(3, 3, VISION["image_size"], VISION["image_size"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf.get_image_features(pixels).pooler_output
        features = hf.vision_model(pixels).last_hidden_state
        ours = proj(features)
    diff = float((ours - theirs).abs().max())
    assert ours.shape == theirs.shape == (3, QUERIES, OPT["hidden_size"])
    assert diff <= COMPONENT_TOL, f"BLIP-2 Q-Former + projection: max abs diff {diff:.3g} > {COMPONENT_TOL}"
    # the layers alternate cross-attention as cross_attention_frequency says (0 and 2 of 3)
    assert [b.has_cross_attention for b in proj.qformer.blocks] == [True, False, True]


# --- the blip_2 importer against transformers' Blip2ForConditionalGeneration -----------------------------------------
TOL = 1e-4
NEW_TOKENS = 16
PROMPTS = ["Question: what is in the image? Answer:", "Describe this picture."]
ANSWERS = ["a red square", "noise"]
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 255, (VISION["image_size"],) * 2 + (3,), dtype=np.uint8))
            for _ in PROMPTS]


@pytest.fixture(scope="module", params=["opt", "t5"])
def imported(request, tmp_path_factory) -> tuple[str, Path, Any, Any]:
    folder = tiny_blip_folder(tmp_path_factory.mktemp(f"blip2-{request.param}"), "blip-2", request.param, seed=7)
    model = import_checkpoint(folder)
    hf = Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    return request.param, folder, model, hf


def parity(lm: str, model: Any, hf: Any, processor: Any, pictures: list[Image.Image], family: str) -> float:
    """Max |mmhub - transformers| logit over every real position of a 2-sample batch (prompts + answers), after
    checking that mmhub's token ids equal the family processor's."""
    convs = [[{"role": "user", "content": f"<image>{p}"}, {"role": "assistant", "content": a}]
             for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    batch = model.batch(convs, [{"image": [im]} for im in pictures])
    enc = processor(images=pictures, text=PROMPTS, padding=True, return_tensors="pt")
    theirs_ids = [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    assert hf_ids(model, batch) == theirs_ids, "mmhub's prompt tokens differ from the processor's"
    assert torch.allclose(batch["media"]["image"], enc["pixel_values"], atol=1e-6), "pixels differ"
    extra = {k: v for k, v in enc.items() if k.startswith("qformer_")}
    with torch.no_grad():
        out = model(**batch)
        if lm == "t5":  # the decoder is teacher-forced on the answer, behind the start token, as mmhub does
            target, keep = out.labels, out.labels != -100
            start = torch.full_like(target[:, :1], model.backbone.decoder_start_token_id)
            dec = torch.cat([start, target[:, :-1].masked_fill(~keep[:, :-1], model.processor.pad_id)], 1)
            dec_mask = torch.cat([torch.ones_like(keep[:, :1]), keep[:, :-1]], 1).long()
            theirs = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        pixel_values=enc["pixel_values"], decoder_input_ids=dec, decoder_attention_mask=dec_mask,
                        **extra).logits
            real = keep
            ours = out.logits
        else:  # the whole sequence (prompt + answer) in one causal pass
            full = [hf_ids(model, {**batch, "labels": torch.full_like(batch["labels"], -100)})[i]
                    for i in range(len(PROMPTS))]
            ids = torch.full((len(full), max(map(len, full))), model.processor.pad_id)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(full):
                ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
            theirs = hf(input_ids=ids, attention_mask=mask, pixel_values=enc["pixel_values"], **extra).logits
            real = mask.bool()
            ours = out.logits[:, :ids.shape[1]]
    vocab = ours.shape[-1]
    diff = float((ours[real] - theirs[..., :vocab][real]).abs().max())
    MEASURED[f"{family}-{lm} logits"] = diff
    return diff


def greedy(lm: str, model: Any, hf: Any, processor: Any, pictures: list[Image.Image]) -> tuple[list, list]:
    """16 greedy tokens per prompt: mmhub's chat API (one batch) and transformers' generate (one prompt at a time)."""
    replies = model.generate([f"<image>{p}" for p in PROMPTS], [{"image": [im]} for im in pictures],
                             max_new_tokens=NEW_TOKENS)
    stops = set(model.stop_token_ids())
    theirs = []
    for p, im in zip(PROMPTS, pictures, strict=True):
        enc = processor(images=[im], text=[p], return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
        out = out[1:] if lm == "t5" else out[enc["input_ids"].shape[1]:]  # drop the start token / the prompt
        theirs.append(first_stop(out, stops))
    return [r.token_ids for r in replies], theirs


def test_blip2_import_logits_equal_transformers(imported, pictures) -> None:
    lm, folder, model, hf = imported
    diff = parity(lm, model, hf, AutoProcessor.from_pretrained(folder), pictures, "blip_2")
    assert diff <= TOL, f"blip_2 ({lm}): max abs logit diff {diff:.3g} > {TOL}"
    assert model.imported_from["importer"] == "blip_2"
    assert model.spec.projectors["image"].type == "qformer"


def test_blip2_import_greedy_generation_equals_transformers(imported, pictures) -> None:
    lm, folder, model, hf = imported
    ours, theirs = greedy(lm, model, hf, AutoProcessor.from_pretrained(folder), pictures)
    assert ours == theirs, f"blip_2 ({lm}): greedy tokens differ: mmhub {ours} vs transformers {theirs}"
    assert all(len(row) >= NEW_TOKENS // 2 for row in ours), f"too few tokens generated to compare: {ours}"


def test_report_measured_differences() -> None:
    print("\nmeasured:", {k: f"{v:.3g}" for k, v in MEASURED.items()})
