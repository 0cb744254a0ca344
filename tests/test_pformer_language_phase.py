"""DLP's language-only phase: the P-Former learns, from captions alone and through the frozen LLM, the prompt that
makes the LLM reconstruct each caption; then it is the Q-Former's alignment target.

Training captions and held-out captions come from two different generators (a seeded random grammar over some
colour/shape pairs vs. a fixed enumeration, in other sentence forms, over the pairs the grammar never uses), so the
held-out losses measure what the P-Former learnt about captions in general, not the training sentences.
"""

from __future__ import annotations

import copy
import itertools
import random
from typing import Any

import pytest
import torch

from mmhub import build
from mmhub.data.base import InMemoryDataset
from mmhub.data.sample import Sample
from mmhub.errors import MMHubError
from mmhub.spec import StageSpec, load_spec
from mmhub.splice import IGNORE, compact
from mmhub.train.objectives import objective_for
from mmhub.train.trainer import Trainer

COLORS = ("red", "green", "blue", "yellow", "black", "white")
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large", "tiny", "big")
PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the middle")
PAIRS = list(itertools.product(COLORS, SHAPES))
HELD_OUT_PAIRS = PAIRS[::5]  # colour/shape pairs no training caption names
TRAIN_PAIRS = [p for p in PAIRS if p not in HELD_OUT_PAIRS]
PHASE_STEPS = 150


def training_captions(n: int, seed: int = 0) -> list[str]:
    """Method A: a seeded random grammar ("a small red circle on the left") over the training pairs."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        color, shape = rng.choice(TRAIN_PAIRS)
        out.append(f"a {rng.choice(SIZES)} {color} {shape} {rng.choice(PLACES)}")
    return out


def held_out_captions() -> list[str]:
    """Method B: every held-out pair, enumerated in order, in two sentence forms the grammar never writes."""
    forms = ("the {s} is {c}", "one {c} {s}, nothing else")
    return [form.format(c=c, s=s) for c, s in HELD_OUT_PAIRS for form in forms]


def caption_sample(i: int, caption: str) -> Sample:
    # the image file does not exist: the language-only phase must never read media
    return Sample(id=f"cap{i}", messages=[{"role": "user", "content": "<image>"},
                                          {"role": "assistant", "content": caption}],
                  media={"image": [f"/nonexistent/pictures/{i}.png"]})


def dlp_spec(stages: list[dict[str, Any]]) -> dict[str, Any]:
    spec = load_spec("dlp:tiny").model_dump(mode="json", exclude={"resolved"})
    spec["stages"] = stages
    return spec


LANGUAGE = {"name": "language", "objective": "pformer", "train": {"projectors": "full"}, "lr": 1e-3,
            "batch_size": 16, "max_steps": PHASE_STEPS, "warmup_ratio": 0.0, "cache_features": False}


def caption_targets(model: Any, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The labelled (assistant-side) token ids of each caption sample, left-aligned: (N, Lt) ids and mask."""
    batch = model.batch([[{"role": "user", "content": "describe"}, {"role": "assistant", "content": c}]
                         for c in captions])
    keep = batch["attention_mask"].bool() & (batch["labels"] != IGNORE)
    ids, mask = compact(batch["labels"].masked_fill(~keep, 0), keep, fill=0)
    return ids, mask


def reconstruction_loss(model: Any, prompt: torch.Tensor | None, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Transformers' own causal-LM loss of the captions after `prompt` (None: the captions alone)."""
    lm = model.backbone.language_model()
    emb = lm.get_input_embeddings()(ids)
    labels = ids.masked_fill(~mask, IGNORE)
    attn = mask.long()
    if prompt is not None:
        emb = torch.cat([prompt.to(emb.dtype), emb], 1)
        labels = torch.cat([torch.full(prompt.shape[:2], IGNORE), labels], 1)
        attn = torch.cat([torch.ones(prompt.shape[:2], dtype=torch.long), attn], 1)
    with torch.no_grad():
        return float(lm(inputs_embeds=emb, attention_mask=attn, labels=labels).loss)


def test_pformer_is_a_stage_objective_that_needs_a_pformer_projector() -> None:
    st = StageSpec(name="language", objective="pformer", train={"projectors": "full"})
    model = build(dlp_spec([]))
    objective = objective_for(st, model)
    assert objective.count_key == "target_tokens" and objective.pairs is False
    assert objective.reads_media is False  # captions alone: the batches carry no pictures
    stages = load_spec("dlp:tiny").stages  # the preset runs the phase before alignment
    assert [(s.name, s.objective) for s in stages[:2]] == [("language", "pformer"), ("pretrain", "sft")]
    llava = build("llava:tiny")
    with pytest.raises(MMHubError, match="no projector with a P-Former.*type: pformer"):
        objective_for(st, llava)


def test_the_objective_is_transformers_reconstruction_loss_plus_the_contrastive_term() -> None:
    model = build(dlp_spec([])).eval()
    proj = model.projectors["image"]
    ids, mask = caption_targets(model, training_captions(6))
    objective = objective_for(StageSpec(name="language", objective="pformer", train={"projectors": "full"}), model)
    with torch.no_grad():
        prompt = proj.reference_prompt(model.backbone.embed(ids), mask)
        summed, count = objective.loss(model, {"input_ids": ids, "attention_mask": mask.long(),
                                               "labels": ids.masked_fill(~mask, IGNORE)}, None)
    stats = objective.stats()
    assert count == int(mask.sum())
    # the reconstruction term is transformers' causal-LM loss of the caption after the P-Former's prompt
    want = reconstruction_loss(model, prompt, ids, mask)
    assert stats["pformer_lm"] == pytest.approx(want, rel=1e-5)
    weight = proj.config.contrastive_weight
    assert float(summed) / count == pytest.approx(want + weight * stats["pformer_contrastive"], rel=1e-5)
    assert stats["pformer_contrastive"] > 0


def test_with_an_encoder_decoder_llm_the_prompt_feeds_the_encoder_as_in_dlps_flan_t5() -> None:
    spec = load_spec("blip-2:tiny").model_dump(mode="json", exclude={"resolved"})
    spec["projectors"]["image"] = {"type": "pformer", "num_queries": 4, "layers": 2, "width": 32, "heads": 2,
                                   "pformer_layers": 1, "pformer_width": 32, "pformer_heads": 2}
    spec["stages"] = []
    model = build(spec).eval()
    assert model.is_encoder_decoder
    proj = model.projectors["image"]
    ids, mask = caption_targets(model, training_captions(5))
    objective = objective_for(StageSpec(name="language", objective="pformer", train={"projectors": "full"}), model)
    with torch.no_grad():
        prompt = proj.reference_prompt(model.backbone.embed(ids), mask)
        objective.loss(model, {"input_ids": ids, "attention_mask": mask.long(),
                               "labels": ids.masked_fill(~mask, IGNORE)}, None)
        # transformers' T5: the prompt is the encoder's input, the caption the decoder's labels
        t5 = model.backbone.language_model()
        want = float(t5(inputs_embeds=prompt, attention_mask=torch.ones(prompt.shape[:2], dtype=torch.long),
                        labels=ids.masked_fill(~mask, IGNORE)).loss)
    assert objective.stats()["pformer_lm"] == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def phased(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny DLP model before and after its language-only phase on method-A captions (no picture exists)."""
    model = build(dlp_spec([LANGUAGE]))
    random_pformer = copy.deepcopy(model.projectors["image"]).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = InMemoryDataset([caption_sample(i, c) for i, c in enumerate(training_captions(PHASE_STEPS * 16))])
    summary = Trainer(model, tmp_path_factory.mktemp("language") / "run", datasets={"language": data},
                      progress_bar=False, log=lambda *_: None).run()
    return {"model": model.eval(), "random_pformer": random_pformer, "before": before, "summary": summary}


@pytest.mark.slow
def test_language_phase_trains_the_alignment_target_from_captions_alone(phased: dict[str, Any]) -> None:
    model, random_pformer, before, summary = (phased[k] for k in ("model", "random_pformer", "before", "summary"))
    proj = model.projectors["image"]
    assert summary["language"]["steps"] == PHASE_STEPS and summary["language"]["skipped"] == 0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # only the P-Former learns: the LLM, the encoder and the Q-Former + linear stay as they were
    assert changed and all(k.startswith("projectors.image.pformer") for k in changed), sorted(changed)[:5]
    assert any(k.startswith("projectors.image.pformer.") for k in changed)

    ids, mask = caption_targets(model, held_out_captions())
    emb = model.backbone.embed(ids)
    with torch.no_grad():
        trained = proj.reference_prompt(emb, mask)
        untrained = random_pformer.reference_prompt(emb, mask)
    # the alignment target is no longer the random P-Former's
    rel = float((trained - untrained).norm() / untrained.norm())
    assert rel > 0.5, rel
    # held-out captions (another generator, unseen colour/shape pairs): the trained prompt lets the frozen LLM
    # reconstruct them better than the random P-Former's prompt and than no prompt at all. Measured (150 steps):
    # 5.55 vs 5.81 (random P-Former) and 5.83 (no prompt); the tiny frozen LLM is random, so most of what the prompt
    # can carry is the captions' token statistics (another caption's prompt does about as well)
    loss_trained = reconstruction_loss(model, trained, ids, mask)
    loss_random = reconstruction_loss(model, untrained, ids, mask)
    loss_none = reconstruction_loss(model, None, ids, mask)
    print(f"\nheld-out reconstruction loss: trained P-Former {loss_trained:.3f}, random P-Former {loss_random:.3f}, "
          f"no prompt {loss_none:.3f}; target moved by {rel:.2f} of its norm")
    assert loss_trained < loss_random - 0.15 and loss_trained < loss_none - 0.15

