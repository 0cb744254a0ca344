"""BLIP-2: mmhub's qformer (layout blip2) computes transformers' Q-Former, and the `blip_2` import matches
transformers' Blip2ForConditionalGeneration (OPT and Flan-T5 backbones) in logits and greedy generation."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration

from mmhub.interfaces import BuildContext
from mmhub.projectors.qformer import QFormerProjector
from mmhub.projectors.qformer_blip2 import qformer_state
from mmhub.testing.tiny_blip import OPT, QFORMER, QUERIES, VISION, perturb

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
