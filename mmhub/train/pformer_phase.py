"""``objective: pformer``: DLP's language-only phase, the P-Former learning prompts from text through the frozen LLM.

DLP ("Bootstrapping Vision-Language Learning with Decoupled Language Pre-training", Jian et al.,
NeurIPS 2023) trains its P-Former before any picture is seen: the P-Former reads a sentence and
predicts ``num_queries`` prompt embeddings; the frozen LLM, given that prompt followed by the
sentence, is trained (through the P-Former only) to reconstruct the sentence: an autoencoder whose
decoder is the frozen LLM. DLP adds a self-contrastive term on the P-Former's sentence features
(see `mmhub.projectors.pformer`). The trained P-Former is then the frozen alignment target of the
vision-language stages.

Every projector of the model that has a P-Former (a ``language_phase`` method, the ``pformer``
projector) learns. The stage reads ordinary caption samples: each sample's labelled (assistant)
tokens are the sentence; its media are never loaded (``reads_media = False``: the trainer drops
them), so an image-caption set serves as is. Per sentence of L tokens the loss is the LLM's
next-token cross-entropy of the L tokens after the prompt, summed over the batch's tokens (the
objective counts target tokens), plus ``contrastive_weight`` x the contrastive term per token. A
decoder-only LLM reads ``[prompt; sentence]``; an encoder-decoder one (Flan-T5) reads the prompt in
its encoder and the sentence, teacher-forced, in its decoder. The stage should train the projectors
only (``train: {projectors: full}``): the Q-Former gets no gradient here, the LLM stays frozen.
"""

from __future__ import annotations

from typing import Any

import torch

from mmhub.errors import MMHubError
from mmhub.spec import StageSpec
from mmhub.splice import IGNORE, compact


def prompt_formers(model: Any, stage: StageSpec) -> list[str]:
    """The modalities whose projector has a P-Former; a named error when none has."""
    found = [m for m, p in model.projectors.items() if callable(getattr(p, "language_phase", None))]
    if not found:
        have = ", ".join(f"{m}={p.name}" for m, p in model.projectors.items()) or "none"
        raise MMHubError(f"stage {stage.name!r} has objective: pformer, but there is no projector with a P-Former "
                         f"(projectors: {have}); use type: pformer for the projector DLP aligns, or another objective")
    return found


def reconstruction_losses(model: Any, prompt: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (n,) of the frozen LLM reproducing the sentences `ids` (N, L) (real where `mask`)
    after `prompt` (N, Q, H): the n real tokens in row-major order."""
    embeds = model.backbone.embed(ids)
    prompt = prompt.to(embeds.dtype)
    N, Q = prompt.shape[:2]
    if model.is_encoder_decoder:  # the prompt is the encoder's input, the sentence the decoder's (teacher-forced)
        start = torch.full_like(ids[:, :1], model.backbone.decoder_start_token_id)
        dec_in = torch.cat([start, ids[:, :-1].masked_fill(~mask[:, :-1], model.processor.pad_id)], 1)
        dec_mask = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], 1).long()
        hidden = model.backbone(prompt, torch.ones(N, Q, dtype=torch.long, device=prompt.device),
                                decoder_input_ids=dec_in, decoder_attention_mask=dec_mask)
        states = hidden[mask]
    else:  # [prompt; sentence]: position Q - 1 + j predicts token j
        inputs = torch.cat([prompt, embeds], 1)
        attn = torch.cat([torch.ones(N, Q, dtype=torch.long, device=mask.device), mask.long()], 1)
        hidden = model.backbone(inputs, attn)
        states = hidden[:, Q - 1:-1][mask]
    target = ids[mask]
    if model.signal_tokens is not None:
        target = model.signal_tokens.columns(target)
    return model.label_cross_entropy(states, target)


class PFormerLanguageLoss:
    """Sentence reconstruction through the frozen LLM from the P-Former's prompt, plus DLP's contrastive term;
    summed over the micro-batch's target tokens."""

    count_key = "target_tokens"
    pairs = False
    reads_media = False  # text alone: the trainer never loads the samples' media

    def __init__(self, model: Any, stage: StageSpec):
        self.model = model
        self.modalities = prompt_formers(model, stage)
        self._stats: dict[str, float] = {}

    def prepare(self, batch: dict[str, Any], ordered: list[Any]) -> None:
        pass

    def loss(self, model: Any, batch: dict[str, Any], stage: Any) -> tuple[torch.Tensor, int]:
        if hasattr(model, "module"):  # DDP / FSDP: calling the parts directly would skip the gradient sync
            raise MMHubError(f"stage {getattr(stage, 'name', '?')!r}: objective pformer runs on one process; "
                             "launch the stage without multiple processes")
        inner = self.model
        labels = batch["labels"].to(inner.device)
        keep = batch["attention_mask"].to(inner.device).bool() & (labels != IGNORE)
        ids, mask = compact(labels.masked_fill(~keep, inner.processor.pad_id), keep, fill=inner.processor.pad_id)
        rows = mask.any(1)
        n = int(mask.sum())
        if n == 0:  # nothing to reconstruct: a zero that keeps the graph
            return sum(p.sum() * 0.0 for p in inner.projectors[self.modalities[0]].parameters()), 0
        ids, mask = ids[rows], mask[rows]
        sentences = inner.backbone.embed(ids)
        total, lm, contrastive = 0.0, 0.0, 0.0
        for m in self.modalities:
            prompt, contrast = inner.projectors[m].language_phase(sentences, mask)
            ce = reconstruction_losses(inner, prompt, ids, mask).sum()
            total = total + ce + contrast.float() * n
            lm += float(ce.detach()) / n
            contrastive += float(contrast.detach())
        k = len(self.modalities)
        self._stats = {"pformer_lm": lm / k, "pformer_contrastive": contrastive / k}
        return total, n * k

    def stats(self) -> dict[str, float]:
        return dict(self._stats)
