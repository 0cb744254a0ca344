"""BLIP-2's first stage (representation learning, paper sec. 3.2): the Q-Former's ITC, ITM and ITG losses.

Three objectives train the Q-Former against a frozen image encoder, each with its own
self-attention mask over [queries; text] (the paper's Figure 2):

* ITC, image-text contrastive: the queries read the image (no text), the text goes alone through
  the same blocks (no queries, no cross-attention) and its first token ([CLS]) is the text
  embedding. Both are projected and L2-normalised; an image-text similarity is the *max over
  queries* of query . text, divided by a learned temperature (0.07 at start). The loss is the
  symmetric InfoNCE over the batch: (CE(image->text) + CE(text->image)) / 2, with LAVIS's label
  smoothing 0.1.
* ITM, image-text matching: queries and text attend to each other freely (bidirectional mask);
  a linear head maps each query output to 2 logits, averaged over the queries; binary CE over
  the positive pairs and, per image and per text, one hard negative drawn with probability
  softmax(similarity) (the diagonal excluded), as in BLIP-2.
* ITG, image-grounded text generation: the first text token becomes the decoder token ([DEC]);
  queries attend to queries only, text attends to every query and to the text before it (the
  multimodal causal mask); a BERT LM head (dense -> GELU -> LayerNorm -> word-embedding
  decoder, tied as in BERT) predicts each next text token; CE with label smoothing 0.1.

`QFormerPretrainHeads` holds the parameters only this stage uses (ITC projections, ITM head, LM
head transform, temperature); the text side itself (BERT word/position embeddings, the text FFN of
every block) is `BertQFormer`'s. The loss functions take plain tensors so each is tested against its
equation. Negatives are in-batch on each process (LAVIS gathers features over all GPUs first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmhub.projectors.qformer_blip2 import BertQFormer

LABEL_SMOOTHING = 0.1  # LAVIS's ITC and ITG (BertLMHeadModel) cross-entropies
TEMPERATURE = 0.07  # the contrastive temperature at start (learned)


class QFormerPretrainHeads(nn.Module):
    """The first stage's own parameters: vision/text projections to `embed_dim`, the ITM head, the LM head transform
    and bias (its decoder is the word-embedding matrix), and the learned temperature."""

    def __init__(self, width: int, embed_dim: int, vocab: int, eps: float):
        super().__init__()
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.itm_head = nn.Linear(width, 2)
        self.lm_transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=eps))
        self.lm_bias = nn.Parameter(torch.zeros(vocab))
        self.temp = nn.Parameter(torch.tensor(TEMPERATURE))


@dataclass
class TextBatch:
    """The Q-Former's own token ids of a batch of captions: (N, L) right-padded, [CLS]-equivalent first."""

    ids: torch.Tensor
    mask: torch.Tensor
    dec_id: int  # ITG's first token ([DEC])


def itc_loss(image_feats: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor | float,
             label_smoothing: float = LABEL_SMOOTHING) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE with the max over queries. image_feats (N, Q, D) and text_feat (N, D), both L2-normalised;
    pair i is image i with text i. Returns (loss, sim_i2t (N, N), sim_t2i (N, N)), similarities already / temp."""
    sim = torch.einsum("iqd,td->itq", image_feats, text_feat).amax(-1)  # (images, texts): max over queries
    sim_i2t = sim / temp
    sim_t2i = sim.t() / temp
    targets = torch.arange(sim.shape[0], device=sim.device)
    loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2
    return loss, sim_i2t, sim_t2i


def hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP-2's ITM negatives: for each text an image, for each image a text, drawn with probability
    softmax(similarity) + 1e-4, never the item's own pair. Returns (negative image index per text (N,),
    negative text index per image (N,))."""
    n = sim_i2t.shape[0]
    if n < 2:
        raise ValueError(f"ITM needs at least 2 pairs in a batch to draw a negative, got {n}; raise batch_size")
    with torch.no_grad():
        eye = torch.eye(n, dtype=torch.bool, device=sim_i2t.device)
        w_t2i = (F.softmax(sim_t2i.float(), 1) + 1e-4).masked_fill(eye, 0)
        w_i2t = (F.softmax(sim_i2t.float(), 1) + 1e-4).masked_fill(eye, 0)
        device = "cpu" if generator is not None else w_t2i.device
        neg_image = torch.multinomial(w_t2i.to(device), 1, generator=generator)[:, 0]
        neg_text = torch.multinomial(w_i2t.to(device), 1, generator=generator)[:, 0]
    return neg_image.to(sim_i2t.device), neg_text.to(sim_i2t.device)


def itm_loss(logits: torch.Tensor, n_pos: int) -> torch.Tensor:
    """Binary CE of the matching logits (3N, 2), rows ordered [N positives; 2N negatives]."""
    labels = torch.cat([torch.ones(n_pos, dtype=torch.long), torch.zeros(logits.shape[0] - n_pos, dtype=torch.long)])
    return F.cross_entropy(logits, labels.to(logits.device))


def itg_mask(n_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """The multimodal causal mask (N, Q + L, Q + L), True = row may attend to column: queries see the queries only;
    text position j sees every query and the real text positions <= j."""
    N, L = text_mask.shape
    Q, device = n_queries, text_mask.device
    mask = torch.zeros(N, Q + L, Q + L, dtype=torch.bool, device=device)
    mask[:, :Q, :Q] = True
    mask[:, Q:, :Q] = True
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    mask[:, Q:, Q:] = causal[None] & text_mask.bool()[:, None, :]
    return mask


def itg_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
             label_smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
    """Causal LM loss on the text: logits (N, L, V) at each decoder position predict the next real token of `ids`
    (N, L) (padding, mask False, is ignored); mean over the predicted tokens."""
    labels = ids.masked_fill(~mask.bool(), -100)[:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100, label_smoothing=label_smoothing)


def image_embeddings(qformer: BertQFormer, heads: QFormerPretrainHeads, features: torch.Tensor) -> torch.Tensor:
    """Features (N, T, feature_dim) -> the queries' normalised contrastive embeddings (N, Q, embed_dim)."""
    queries, _ = qformer.states(features)
    return F.normalize(heads.vision_proj(queries), dim=-1)


def text_embeddings(qformer: BertQFormer, heads: QFormerPretrainHeads, text: TextBatch) -> torch.Tensor:
    """Caption ids -> the normalised contrastive embedding of the first ([CLS]) position (N, embed_dim)."""
    _, states = qformer.states(None, text.ids, text.mask)
    return F.normalize(heads.text_proj(states[:, 0]), dim=-1)


def pretrain_losses(qformer: BertQFormer, heads: QFormerPretrainHeads, features: torch.Tensor, text: TextBatch,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """{"itc", "itm", "itg"} of one batch of N (image features, caption) pairs, each a batch mean."""
    if qformer.word_embeddings is None:
        raise ValueError("the first-stage losses read captions through the Q-Former's text side, which this "
                         "Q-Former lacks; build it with pretrain_heads: true")
    N, Q = features.shape[0], qformer.num_queries
    if text.ids.shape[0] != N:
        raise ValueError(f"{text.ids.shape[0]} captions for {N} images; give one caption per image")
    image_feats = image_embeddings(qformer, heads, features)
    loss_itc, sim_i2t, sim_t2i = itc_loss(image_feats, text_embeddings(qformer, heads, text), heads.temp)

    neg_image, neg_text = hard_negatives(sim_i2t, sim_t2i, generator)
    ids_all = torch.cat([text.ids, text.ids, text.ids[neg_text]])
    mask_all = torch.cat([text.mask, text.mask, text.mask[neg_text]])
    feats_all = torch.cat([features, features[neg_image], features])  # (pos, pos), (text, neg image), (neg text, image)
    queries_itm, _ = qformer.states(feats_all, ids_all, mask_all)
    loss_itm = itm_loss(heads.itm_head(queries_itm).mean(1), N)

    dec_ids = text.ids.clone()
    dec_ids[:, 0] = text.dec_id
    _, text_states = qformer.states(features, dec_ids, text.mask, attn_mask=itg_mask(Q, text.mask))
    logits = F.linear(heads.lm_transform(text_states), qformer.word_embeddings.weight, heads.lm_bias)
    loss_itg = itg_loss(logits, dec_ids, text.mask)
    return {"itc": loss_itc, "itm": loss_itm, "itg": loss_itg}
