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

from mmhub import build
from mmhub.errors import ExportError
from mmhub.importers import Checkpoint, ImportOptions, import_checkpoint, load_strict
from mmhub.importers.blip2 import Blip2Importer, blip_parts
from mmhub.importers.instructblip import InstructBlipImporter
from mmhub.interfaces import BuildContext
from mmhub.projectors.qformer import QFormerProjector
from mmhub.projectors.qformer_blip2 import qformer_state
from mmhub.testing.tiny_blip import OPT, QFORMER, QUERIES, VISION, greedy_pair, logit_diff, perturb, tiny_blip_folder
from mmhub.train.trainable import apply_stage

from conftest import TINY_LLAMA

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


def test_swap_the_imported_llm_and_train_one_step(tmp_path) -> None:
    """The imported tower and Q-Former are plain mmhub parts: put a different LLM (LLaMA, another width) behind them,
    and one optimiser step trains the Q-Former's new output projection while the imported parts compute as before."""
    folder = tiny_blip_folder(tmp_path / "blip2", "blip-2", "opt", seed=9)
    imported = import_checkpoint(folder)
    spec, weights = blip_parts(Checkpoint(folder), ImportOptions())
    spec["backbone"] = {"type": "hf_causal_lm", "config": {**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 96},
                        "tokenizer": "byte"}
    spec["stages"] = [{"name": "align", "train": {"projectors": "full"}}]
    model = build(spec)
    load_strict(model.encoders["image"].model, weights["encoders.image.model"], "tower")
    q_state = {k[len("qformer."):]: v for k, v in weights["projectors.image"].items() if k.startswith("qformer.")}
    load_strict(model.projectors["image"].qformer, q_state, "Q-Former")
    assert model.projectors["image"].proj.out_features == 64  # the projection re-inferred for the new LLM
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    pixels = imported.processor.preprocess["image"](picture)[None]
    with torch.no_grad():  # the same tower + Q-Former states as the imported model
        ref = imported.projectors["image"].query_states(imported.encoders["image"](pixels, "image"))
        got = model.projectors["image"].query_states(model.encoders["image"](pixels, "image"))
    assert float((ref - got).abs().max()) <= 1e-6
    batch = model.batch([[{"role": "user", "content": "<image>What is this?"},
                          {"role": "assistant", "content": "a square"}]], [{"image": [picture]}])
    plan = apply_stage(model, model.spec.stages[0])
    assert {k for k, n in plan.trainable.items() if n} == {"projectors.image"}, plan.trainable
    train = [p for p in model.parameters() if p.requires_grad]
    before = model.projectors["image"].proj.weight.detach().clone()
    optimiser = torch.optim.AdamW(train, lr=1e-2)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.projectors["image"].proj.weight.detach())


def test_blip2_export_reloads_in_transformers_with_equal_logits(imported, pictures, tmp_path) -> None:
    """mmhub -> transformers' BLIP-2 folder (config, weights, processor) -> Blip2ForConditionalGeneration: the same
    logits as mmhub through the exported processor, identical weights to the original checkpoint."""
    lm, folder, model, hf = imported
    out = Blip2Importer().export(model, tmp_path / "exported")
    again = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    diff = logit_diff(model, again, AutoProcessor.from_pretrained(out), pictures, PROMPTS, ANSWERS)
    MEASURED[f"blip_2-{lm} export"] = diff
    assert diff <= TOL, f"blip_2 ({lm}) export: max abs logit diff {diff:.3g} > {TOL}"
    ours, theirs = again.state_dict(), hf.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_export_refuses_a_model_blip2_cannot_hold(imported, tmp_path) -> None:
    _, _, model, _ = imported
    with pytest.raises(ExportError, match="instruction_aware"):
        InstructBlipImporter().export(model, tmp_path / "wrong")


def test_report_measured_differences() -> None:
    print("\nmeasured:", {k: f"{v:.3g}" for k, v in MEASURED.items()})


@pytest.mark.parametrize("template,scheme", [("blip-2", "first"), ("blip-2", "always"), ("blip-2-t5", "first")])
def test_blip_templates_tokenize_the_prompt_as_the_processor_does(template: str, scheme: str) -> None:
    """With a SentencePiece-style tokenizer (word marker "▁" prepended only at the start of a text, as LLaMA's and
    T5's fast tokenizers may do), mmhub's ids equal the processor's: the media tokens, then tokenizer(prompt)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from mmhub.processor import MMProcessor
    from mmhub.templates import resolve_template

    vocab = {c: i for i, c in enumerate(["<unk>", "<s>", "</s>", "▁", *map(chr, range(32, 127))])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    special = "$A </s>" if template.endswith("t5") else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(single=special, special_tokens=[("<s>", 1), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = MMProcessor(fast, resolve_template(template, fast), {"image": "<image>"}, {})
    prompt = "What is in the image? Answer:"
    ours = processor.encode(f"<image>{prompt}", {"image": ["an item"]}, preprocess=False).input_ids
    assert ours == fast.convert_tokens_to_ids(["<image>"]) + fast(prompt)["input_ids"]
