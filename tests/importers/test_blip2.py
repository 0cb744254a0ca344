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
from mmhub.testing.tiny_blip import OPT, QFORMER, QUERIES, VISION, greedy_pair, logit_diff, perturb, tiny_blip_folder

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


def test_blip2_import_logits_equal_transformers(imported, pictures) -> None:
    lm, folder, model, hf = imported
    diff = logit_diff(model, hf, AutoProcessor.from_pretrained(folder), pictures, PROMPTS, ANSWERS)
    MEASURED[f"blip_2-{lm}"] = diff
    assert diff <= TOL, f"blip_2 ({lm}): max abs logit diff {diff:.3g} > {TOL}"
    assert model.imported_from["importer"] == "blip_2"
    assert model.spec.projectors["image"].type == "qformer"


def test_blip2_import_greedy_generation_equals_transformers(imported, pictures) -> None:
    lm, folder, model, hf = imported
    ours, theirs = greedy_pair(model, hf, AutoProcessor.from_pretrained(folder), pictures, PROMPTS, NEW_TOKENS)
    assert ours == theirs, f"blip_2 ({lm}): greedy tokens differ: mmhub {ours} vs transformers {theirs}"
    assert all(len(row) >= NEW_TOKENS // 2 for row in ours), f"too few tokens generated to compare: {ours}"


def test_report_measured_differences() -> None:
    print("\nmeasured:", {k: f"{v:.3g}" for k, v in MEASURED.items()})
