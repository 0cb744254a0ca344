"""BLIP-2's first stage (objective: blip2_qformer): each loss against its equation, the attention masks of the
paper's Figure 2, the hard-negative draw, the presets' first stage, and retrieval learnt at test size."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from mmhub.projectors.qformer_blip2 import BertQFormer
from mmhub.projectors.qformer_pretrain import (
    QFormerPretrainHeads,
    TextBatch,
    hard_negatives,
    itc_loss,
    itg_loss,
    itg_mask,
    itm_loss,
    pretrain_losses,
)


def _nll(logits: torch.Tensor, target: int, eps: float) -> float:
    """Cross-entropy of one row written out: (1 - eps) * -log p_target + eps * mean_k -log p_k."""
    logp = [x - math.log(sum(math.exp(y) for y in logits.tolist())) for x in logits.tolist()]
    return (1 - eps) * -logp[target] + eps * sum(-v for v in logp) / len(logp)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_itc_is_symmetric_infonce_with_the_max_over_queries(eps: float) -> None:
    g = torch.Generator().manual_seed(0)
    N, Q, D, temp = 4, 3, 8, 0.07
    image = F.normalize(torch.randn(N, Q, D, generator=g), dim=-1)
    text = F.normalize(torch.randn(N, D, generator=g), dim=-1)
    loss, sim_i2t, sim_t2i = itc_loss(image, text, temp, label_smoothing=eps)
    s = [[max(float(image[i, q] @ text[j]) for q in range(Q)) / temp for j in range(N)] for i in range(N)]
    i2t = sum(_nll(torch.tensor(s[i]), i, eps) for i in range(N)) / N
    t2i = sum(_nll(torch.tensor([s[i][j] for i in range(N)]), j, eps) for j in range(N)) / N
    assert float(loss) == pytest.approx((i2t + t2i) / 2, rel=1e-5)
    assert torch.allclose(sim_i2t, torch.tensor(s), atol=1e-4) and torch.allclose(sim_t2i, torch.tensor(s).t(),
                                                                                   atol=1e-4)
    # not the mean over queries: a different number
    mean_q = torch.einsum("iqd,td->itq", image, text).mean(-1) / temp
    assert abs(float(F.cross_entropy(mean_q, torch.arange(N))) - i2t) > 1e-3


def test_itm_is_binary_cross_entropy_over_positives_then_negatives() -> None:
    logits = torch.tensor([[0.1, 2.0], [1.0, -1.0], [0.3, 0.2], [2.0, 0.5], [-0.5, 0.4], [0.0, 0.0]])
    labels = [1, 1, 0, 0, 0, 0]
    want = sum(_nll(logits[i], labels[i], 0.0) for i in range(6)) / 6
    assert float(itm_loss(logits, 2)) == pytest.approx(want, rel=1e-6)


def test_itg_is_causal_lm_on_the_real_text_tokens() -> None:
    g = torch.Generator().manual_seed(1)
    N, L, V = 2, 5, 7
    logits = torch.randn(N, L, V, generator=g)
    ids = torch.randint(0, V, (N, L), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    for eps in (0.0, 0.1):
        terms = [_nll(logits[n, j], int(ids[n, j + 1]), eps) for n in range(N) for j in range(L - 1) if mask[n, j + 1]]
        assert float(itg_loss(logits, ids, mask, label_smoothing=eps)) == pytest.approx(sum(terms) / len(terms),
                                                                                        rel=1e-5)


def test_itg_mask_is_figure_2s_multimodal_causal_mask() -> None:
    text_mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    m = itg_mask(2, text_mask).int()
    assert m[0].tolist() == [[1, 1, 0, 0, 0],  # queries: the queries only
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],  # text j: every query, text <= j
                             [1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 1]]
    assert m[1, 4].tolist() == [1, 1, 1, 1, 0]  # padding is never a key


def test_hard_negatives_follow_the_similarity_and_skip_the_pair() -> None:
    N = 4
    sim = torch.zeros(N, N)
    sim[:, 2] = 30.0  # every image is near text 2 (and text 2's own image excluded)
    sim[2, 0] = 30.0
    g = torch.Generator().manual_seed(0)
    draws = [hard_negatives(sim, sim.t(), g) for _ in range(50)]
    neg_text = torch.stack([d[1] for d in draws])  # per image, a text
    neg_image = torch.stack([d[0] for d in draws])  # per text, an image
    assert (neg_text != torch.arange(N)).all() and (neg_image != torch.arange(N)).all()
    assert (neg_text[:, [0, 1, 3]] == 2).float().mean() > 0.95 and (neg_text[:, 2] == 0).float().mean() > 0.95
    with pytest.raises(ValueError, match="at least 2 pairs"):
        hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1))


def _tiny_qformer(seed: int = 0) -> tuple[BertQFormer, QFormerPretrainHeads]:
    torch.manual_seed(seed)
    qf = BertQFormer(num_queries=3, width=16, layers=2, heads=2, hidden=32, eps=1e-12, backend="eager",
                     feature_dim=12, cross_every=2, text_vocab=20, text_positions=16).eval()
    return qf, QFormerPretrainHeads(16, 8, 20, 1e-12).eval()


def test_qformer_states_masks_as_in_figure_2() -> None:
    qf, _ = _tiny_qformer()
    g = torch.Generator().manual_seed(3)
    feats, other = torch.randn(2, 5, 12, generator=g), torch.randn(2, 5, 12, generator=g)
    ids = torch.randint(1, 20, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    later = ids.clone()
    later[:, 4:] = (later[:, 4:] + 1) % 20
    with torch.no_grad():
        queries_alone, _ = qf.states(feats)
        q_itg, t_itg = qf.states(feats, ids, mask, attn_mask=itg_mask(3, mask))
        _, t_later = qf.states(feats, later, mask, attn_mask=itg_mask(3, mask))
        _, t_other = qf.states(other, ids, mask, attn_mask=itg_mask(3, mask))
        q_itm, _ = qf.states(feats, ids, mask)
        q_itm_later, _ = qf.states(feats, later, mask)
        _, text_only = qf.states(None, ids, mask)
        _, text_only_later = qf.states(None, later, mask)
        forward = qf(feats)
    assert torch.allclose(q_itg, queries_alone, atol=1e-6)  # ITG: the queries never see the text
    assert torch.allclose(forward, queries_alone, atol=1e-6)  # the LM stage's forward is the same query pass
    assert torch.allclose(t_itg[:, :4], t_later[:, :4], atol=1e-6)  # causal: earlier text ignores later text
    assert not torch.allclose(t_itg[:, :4], t_other[:, :4], atol=1e-4)  # ... but reads the image via the queries
    assert not torch.allclose(q_itm, q_itm_later, atol=1e-4)  # ITM: the queries read the whole text
    assert not torch.allclose(text_only[:, :4], text_only_later[:, :4], atol=1e-4)  # text alone: bidirectional


def test_pretrain_losses_train_the_text_side_and_the_heads() -> None:
    qf, heads = _tiny_qformer()
    qf.train()
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(4, 5, 12, generator=g)
    ids = torch.randint(3, 20, (4, 6), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False
    losses = pretrain_losses(qf, heads, feats, TextBatch(ids, mask, dec_id=2), torch.Generator().manual_seed(0))
    assert set(losses) == {"itc", "itm", "itg"} and all(torch.isfinite(v) for v in losses.values())
    assert float(losses["itg"].detach()) > math.log(20) * 0.5  # untrained: near uniform over the 20 ids
    sum(losses.values()).backward()
    for name, p in [("word_embeddings", qf.word_embeddings.weight), ("text_ffn", qf.blocks[1].text_ffn.up.weight),
                    ("queries", qf.queries), ("itm_head", heads.itm_head.weight), ("temp", heads.temp),
                    ("vision_proj", heads.vision_proj.weight), ("lm_transform", heads.lm_transform[0].weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# -- the stage through the trainer, and the presets -----------------------------------------------------
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}
SHAPES = ["circle", "square", "triangle"]
TRAIN_TEMPLATES = ["a {c} {s}", "a picture of a {c} {s}", "{c} {s} on a grey background", "there is a {c} {s}"]
HELD_OUT_TEMPLATE = "one {c} {s} in the middle"  # never seen in training


def _picture(colour: str, shape: str, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (56, 56), (128, 128, 128))
    d = ImageDraw.Draw(img)
    r = rng.randint(14, 22)
    cx, cy = rng.randint(r, 56 - r), rng.randint(r, 56 - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def _captioned(n: int, seed: int) -> list:
    from mmhub.data.sample import Sample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        caption = rng.choice(TRAIN_TEMPLATES).format(c=c, s=s)
        out.append(Sample(f"s{i}", [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": caption}],
                          {"image": [_picture(c, s, rng)]}))
    return out


def _recall_at_1(model, per_class: int = 3, seed: int = 99) -> float:
    """Image -> caption recall@1 over the 12 classes' held-out-template captions (chance 1/12)."""
    rng = random.Random(seed)
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    captions = [HELD_OUT_TEMPLATE.format(c=c, s=s) for c, s in classes]
    pics, truth = [], []
    for k, (c, s) in enumerate(classes):
        for _ in range(per_class):
            pics.append(model.processor.preprocess["image"](_picture(c, s, rng)))
            truth.append(k)
    model.eval()
    with torch.no_grad():
        feats = model.encode_features({"image": torch.stack(pics)})["image"]
        sim = model.projectors["image"].similarity(feats, captions)
    return float((sim.argmax(1) == torch.tensor(truth)).float().mean())


def test_blip2_and_instructblip_presets_start_with_the_first_stage() -> None:
    from mmhub.spec import load_spec

    for name in ("blip-2", "instructblip"):
        for size in ("tiny", "full"):
            spec = load_spec(f"{name}:{size}")
            first = spec.stages[0]
            assert first.objective == "blip2_qformer" and first.train.get("projectors") == "full", (name, size)
            image = spec.projectors["image"].settings()
            assert image.get("layout") == "blip2" and image.get("pretrain_heads") is True, (name, size)


def test_the_preset_first_stage_runs_in_the_trainer(tmp_path) -> None:
    from mmhub.assembly import build
    from mmhub.spec import load_spec
    from mmhub.train.trainer import Trainer

    spec = load_spec("blip-2:tiny").model_dump(mode="json", exclude={"resolved"})
    first = spec["stages"][0]["name"]
    spec["stages"][0]["batch_size"] = 4  # the trainer needs a whole batch in the data (8 samples here)
    model = build(spec)
    summary = Trainer(model, tmp_path, datasets={first: _captioned(8, 0)}, progress_bar=False,
                      log=lambda *_: None).run(stage=first, max_steps=2)
    assert summary[first]["steps"] == 2 and summary[first]["skipped"] == 0
    assert math.isfinite(summary[first]["final_loss"])


@pytest.mark.slow
def test_first_stage_learns_retrieval_on_held_out_captions(tmp_path) -> None:
    from mmhub.assembly import build
    from mmhub.spec import load_spec
    from mmhub.train.trainer import Trainer

    spec = load_spec("blip-2:tiny").model_dump(mode="json", exclude={"resolved"})
    first = spec["stages"][0]
    first.update(lr=2e-3, batch_size=24, warmup_ratio=0.05, save_every=None)
    spec["seed"] = 0
    model = build(spec)
    before = _recall_at_1(model, per_class=20)
    Trainer(model, tmp_path, datasets={first["name"]: _captioned(STEPS * 24, 1)}, progress_bar=False,
            log=lambda *_: None).run(stage=first["name"], max_steps=STEPS)
    after = _recall_at_1(model, per_class=20)
    print(f"\nrecall@1 image->caption (12 classes x 20 held-out pictures, chance 0.083): before {before:.3f}, "
          f"after {STEPS} steps {after:.3f}")
    assert after >= MIN_RECALL, (before, after)
    assert after - before >= 0.1, (before, after)


# measured (300 steps, 240 held-out pictures): 0.083 (chance) before; after, with the spec's seed 0 / 1 / 2 / 3 (and the
# training pictures' seed moved with it), 0.329 / 0.338 / 0.350 / 0.504; the float sums differ across CPUs and thread
# counts and a run drifts with them, so the floor is one no measured run came near and chance cannot reach: 0.2 is 2.4x
# chance, above chance's 99.9% quantile at 240 pictures (0.14)
STEPS, MIN_RECALL = 300, 0.2
