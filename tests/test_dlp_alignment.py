"""DLP's second phase at tiny size: does aligning the Q-Former to the P-Former's prompt help the frozen LLM?

DLP (Jian et al., NeurIPS 2023) trains a P-Former on text alone (objective ``pformer``), then adds
``MSE(Q-Former + linear output, P-Former prompt of the paired caption)`` to the image-caption stage. Its claim:
the aligned Q-Former's prompt serves the frozen LLM better. A random frozen LLM cannot show it (it reads no
prompt), so the test first pre-trains the tiny LLM on caption-like text documents (several sentences about one
object), which makes it a language model that uses its context; then freezes it.

Three text and picture generators keep the measurement honest:

- the LLM's text: documents of 2-3 sentences about one colour/shape, any sentence form (`FORMS_A/B/C`);
- the P-Former's captions and the alignment stage's (image, caption) pairs: method A (forms `FORMS_A`, pictures
  drawn at 56 px on mid-grey);
- the held-out pairs: method B (forms `FORMS_B`, pictures drawn at 112 px on a darker grey, then downscaled). The
  LLM knows these forms as text (as a pre-trained LLM knows the language); no P-Former or alignment step saw them.

The two arms of the alignment stage start from the same weights, see the same batches in the same order and run
the same steps: DLP's (``align_weight`` 1.0, the P-Former after its language-only phase) and no P-Former loss
(``align_weight`` 0.0).

What the test holds: the alignment term does its job on pictures and captions it never saw: the Q-Former's prompt
for a held-out pair lies much nearer the trained P-Former's prompt of its caption than without the term (under 0.6 of
the distance; measured 0.22-0.42 over six seed sets).

What it does not claim: DLP's result, that the frozen LLM then reads the aligned prompt better. At this size that is
not measurable. Over six seed sets (torch's seed and the seeds of the LLM's text, the P-Former's captions and the
alignment pairs all moved by k = 0..5), the held-out caption loss after the stage, with the P-Former loss / without /
towards the untrained P-Former's prompt, was 0.533 / 0.553 / 0.523, 0.781 / 0.749 / 0.925, 0.451 / 0.444 / 0.362,
0.720 / 0.689 / 0.574, 0.317 / 0.398 / 0.516 and 0.380 / 0.424 / 0.485 (means 0.530 / 0.543 / 0.564): DLP's loss was
the lowest of the three in 2 of 6, lower than without it in 3 of 6. The test prints both arms' losses, so a larger
run can check the claim.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

from mmhub import build
from mmhub.data.base import InMemoryDataset
from mmhub.data.sample import Sample
from mmhub.spec import load_spec
from mmhub.train.trainer import Trainer

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}
SHAPES = ("circle", "square", "triangle")
PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
FORMS_A = ("a {c} {s}", "a picture of a {c} {s}", "there is a {c} {s}", "{c} {s} on a grey background")
FORMS_B = ("the {s} is {c}", "one {c} {s}, nothing else")
FORMS_C = ("{c} {s}", "a {c} {s}", "i see a {c} {s}", "a {s} that is {c}", "look, a {c} {s} here")
LM_STEPS, PHASE_STEPS, ALIGN_STEPS = 300, 300, 100


def dlp_spec(stages: list[dict[str, Any]], **projector: Any) -> dict[str, Any]:
    """dlp:tiny with the `plain` template: the image's prompt directly before the caption, as in DLP's second stage."""
    spec = load_spec("dlp:tiny").model_dump(mode="json", exclude={"resolved"})
    spec["template"] = "plain"
    spec["stages"] = stages
    spec["projectors"]["image"].update(projector)
    return spec


def _draw(d: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, fill: tuple[int, int, int]) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def picture_a(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """Method A: drawn at 56 px on mid-grey."""
    img = Image.new("RGB", (56, 56), (128, 128, 128))
    r = rng.randint(14, 22)
    _draw(ImageDraw.Draw(img), shape, rng.randint(r, 56 - r), rng.randint(r, 56 - r), r, COLOURS[colour])
    return img


def picture_b(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """Method B: drawn at 112 px on a darker grey, then downscaled (soft edges)."""
    img = Image.new("RGB", (112, 112), (105, 105, 105))
    r = rng.randint(24, 36)
    _draw(ImageDraw.Draw(img), shape, rng.randint(r, 112 - r), rng.randint(r, 112 - r), r, COLOURS[colour])
    return img.resize((56, 56), Image.LANCZOS)


def lm_documents(n: int, seed: int) -> list[str]:
    """The LLM's pre-training text: 2-3 sentences, any form, about one colour/shape."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        c, s = rng.choice(PAIRS)
        docs.append(". ".join(rng.choice(FORMS_C + FORMS_A + FORMS_B).format(c=c, s=s)
                              for _ in range(rng.randint(2, 3))))
    return docs


def captions_a(n: int, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    return [(c, s, rng.choice(FORMS_A).format(c=c, s=s)) for c, s in (rng.choice(PAIRS) for _ in range(n))]


def held_out_pairs() -> list[tuple[Image.Image, str]]:
    """Method B: every colour/shape pair in both B forms, two pictures each (48 pairs)."""
    rng = random.Random(7)
    return [(picture_b(c, s, rng), form.format(c=c, s=s)) for c, s in PAIRS for form in FORMS_B for _ in range(2)]


def sample(i: int, caption: str, image: Any) -> Sample:
    return Sample(id=f"s{i}", messages=[{"role": "user", "content": "<image>"},
                                        {"role": "assistant", "content": caption}], media={"image": [image]})


def pretrain_llm(model: Any, steps: int, seed: int = 1) -> None:
    """Next-token training of the backbone's transformers model on `lm_documents`, then frozen."""
    lm = model.backbone.language_model()
    tok = model.processor.tokenizer
    docs = lm_documents(steps * 32, seed)
    lm.train()
    for p in lm.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        ids = [tok(d)["input_ids"] + [tok.eos_token_id] for d in docs[step * 32:(step + 1) * 32]]
        width = max(map(len, ids))
        x = torch.zeros(len(ids), width, dtype=torch.long)
        attn = torch.zeros_like(x)
        for i, row in enumerate(ids):
            x[i, :len(row)] = torch.tensor(row)
            attn[i, :len(row)] = 1
        loss = lm(input_ids=x, attention_mask=attn, labels=x.masked_fill(attn == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in lm.parameters():
        p.requires_grad_(False)
    lm.eval()


def held_out_scores(model: Any, pairs: list[tuple[Image.Image, str]]) -> tuple[float, float]:
    """One forward over `pairs`: the LLM's next-token loss per caption token after the image's prompt (the alignment
    term taken out), and the mean squared distance between the Q-Former's prompt for each pair and the P-Former's
    prompt of its caption (the alignment term at weight 1, whatever the arm's own weight)."""
    projector = model.projectors["image"]
    own = projector.config
    projector.config = own.model_copy(update={"align_weight": 1.0})
    try:
        model.eval()
        b = model.batch([[{"role": "user", "content": "<image>"}, {"role": "assistant", "content": cap}]
                         for _, cap in pairs], [{"image": [img]} for img, _ in pairs])
        with torch.no_grad():
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                        media=b["media"], return_logits=False)
        return float(out.loss - out.aux_loss), float(projector.aux_loss)
    finally:
        projector.config = own


@pytest.mark.slow
def test_alignment_pulls_the_qformer_prompt_to_the_trained_pformer_on_held_out_pairs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    language = {"name": "language", "objective": "pformer", "train": {"projectors": "full"}, "lr": 1e-3,
                "batch_size": 16, "max_steps": PHASE_STEPS, "warmup_ratio": 0.0, "cache_features": False}
    model = build(dlp_spec([language]))
    pretrain_llm(model, LM_STEPS)
    phase = InMemoryDataset([sample(i, cap, f"/nonexistent/{i}.png")  # text alone: pictures are never read
                             for i, (_, _, cap) in enumerate(captions_a(PHASE_STEPS * 16, seed=2))])
    Trainer(model, tmp_path / "language", datasets={"language": phase}, progress_bar=False,
            log=lambda *_: None).run()
    state = copy.deepcopy(model.state_dict())

    rng = random.Random(3)
    pairs = InMemoryDataset([sample(i, cap, picture_a(c, s, rng))
                             for i, (c, s, cap) in enumerate(captions_a(ALIGN_STEPS * 16, seed=4))])
    align = {"name": "pretrain", "train": {"projectors": "full"}, "lr": 1e-3, "batch_size": 16,
             "max_steps": ALIGN_STEPS, "warmup_ratio": 0.0, "cache_features": False}
    held = held_out_pairs()
    losses, distances = {}, {}
    for weight in (1.0, 0.0):
        arm = build(dlp_spec([align], align_weight=weight))
        arm.load_state_dict(state)  # same LLM, P-Former and starting Q-Former in both arms
        start, _ = held_out_scores(arm, held)
        Trainer(arm, tmp_path / f"align{weight}", datasets={"pretrain": pairs}, progress_bar=False,
                log=lambda *_: None).run()
        losses[weight], distances[weight] = held_out_scores(arm, held)
    print(f"\nheld-out (method B pairs) after {ALIGN_STEPS} steps, with the P-Former loss / without: distance to the "
          f"P-Former's prompt {distances[1.0]:.3f} / {distances[0.0]:.3f}; caption loss (start {start:.3f}) "
          f"{losses[1.0]:.3f} / {losses[0.0]:.3f}")
    assert distances[1.0] < 0.6 * distances[0.0], distances


def test_a_pformer_stage_with_cache_features_fingerprints_no_encoder(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The language-only phase loads no media, so a feature cache (which hashes the frozen encoder's weights) is
    useless work there; the sft stage after it still caches."""
    import mmhub.train.feature_cache as feature_cache

    fingerprinted: list[str] = []
    real = feature_cache.encoder_identity

    def spy(encoder: torch.nn.Module, modality: str) -> str:
        fingerprinted.append(modality)
        return real(encoder, modality)

    monkeypatch.setattr(feature_cache, "encoder_identity", spy)
    monkeypatch.setenv("MMHUB_HOME", str(tmp_path / "home"))
    language = {"name": "language", "objective": "pformer", "train": {"projectors": "full"}, "batch_size": 2,
                "max_steps": 1, "cache_features": True}
    model = build(dlp_spec([language]))
    texts = InMemoryDataset([sample(i, cap, f"/nonexistent/{i}.png") for i, (_, _, cap) in
                             enumerate(captions_a(4, seed=0))])
    Trainer(model, tmp_path / "run", datasets={"language": texts}, progress_bar=False, log=lambda *_: None).run()
    assert fingerprinted == []
    assert not (tmp_path / "home" / "features").exists()

    rng = random.Random(0)
    pretrain = {"name": "pretrain", "train": {"projectors": "full"}, "batch_size": 2, "max_steps": 1,
                "cache_features": True}
    model = build(dlp_spec([pretrain]))
    pictures = InMemoryDataset([sample(i, cap, picture_a(c, s, rng)) for i, (c, s, cap) in
                                enumerate(captions_a(4, seed=0))])
    Trainer(model, tmp_path / "run2", datasets={"pretrain": pictures}, progress_bar=False, log=lambda *_: None).run()
    assert fingerprinted == ["image"]
