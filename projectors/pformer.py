"""P-Former input projector: a Q-Former whose output is pulled towards a language-only "reference prompt".

DLP ("Bootstrapping Vision-Language Learning with Decoupled Language Pre-training", Jian et
al., NeurIPS 2023) splits BLIP-2-style training in two. First, language only: a
*P-Former* (its own learned queries reading a sentence) is trained so that the prompt it
predicts makes the frozen LLM reproduce that sentence. Then, vision-language: the P-Former
is frozen and its prompt for the paired caption/answer becomes a regression target for the
Q-Former + linear output, added to the usual losses as an alignment loss.

The first phase is `language_phase` (run by a stage with ``objective: pformer``,
`mmhub.train.pformer_phase`, which puts the prompt in front of the frozen LLM and adds the
reconstruction loss). It follows DLP's reference implementation (``pformer_opt.py``): a random
``mask_ratio`` (25 %) of each sentence's tokens is hidden from the P-Former while training (DLP
replaces them by BERT's [MASK]; here they leave the attention, as these inputs are LLM embeddings
without a mask token), and a self-contrastive term is added: each sentence's feature (here the
mean of the P-Former's query outputs through ``pformer_contrast`` to ``contrastive_dim``,
L2-normalised; DLP takes its BERT's CLS state) is scored against every sentence of the batch by
cosine / ``pformer_temp`` (learnt, from 0.07; clamped to [0.001, 0.5]), with cross-entropy towards
itself and label smoothing 0.1, weighted by ``contrastive_weight``. DLP's reference code also adds
a vector-quantisation term (prompts pulled to their nearest vocabulary embedding); it is not here.

The projector's second phase: at inference it *is* a Q-Former + linear (the P-Former
is not run). During a forward whose `TextContext` carries ``target`` (training with labels),
it also runs the P-Former on the target embeddings and sets ``self.aux_loss`` to
``align_weight * distance(qformer_output, stop_gradient(reference_prompt))`` where the
distance is the mean squared error (``align_loss: mse``, DLP's choice) or the mean of
``1 - cosine`` per token (``align_loss: cosine``). The stop-gradient sits on the P-Former
side, as in DLP where the P-Former is frozen in this phase: the loss trains the Q-Former
and its linear, never the P-Former (whose parameters therefore get no gradient here; they
are trained by the language-only phase, `language_phase`, or loaded).

Items whose target has no real token are left out of the loss; when none has one, or no
target is given (inference), ``aux_loss`` is None.

The Q-Former, its blocks and the P-Former are `mmhub.projectors.qformer`'s own modules
(the P-Former is a `QueryTransformer` without cross-attention whose text input is the
target). Used by DLP (BLIP-2 OPT/Flan-T5 with a P-Former).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from mmhub.interfaces import BuildContext, ComponentConfig, TextContext
from mmhub.projectors.qformer import QFormerConfig, QFormerProjector, QueryTransformer


class PFormerConfig(QFormerConfig):
    """Settings of `PFormerProjector`: the Q-Former's (`QFormerConfig`), the P-Former's size and the alignment loss."""

    pformer_layers: int = Field(12, ge=1)
    pformer_width: int = Field(768, ge=1)
    pformer_heads: int = Field(12, ge=1)
    align_weight: float = Field(1.0, ge=0)
    align_loss: Literal["mse", "cosine"] = "mse"
    mask_ratio: float = Field(0.25, ge=0, lt=1, description="language-only phase: share of each sentence's tokens "
                                                             "hidden from the P-Former while training")
    contrastive_weight: float = Field(1.0, ge=0, description="language-only phase: weight of the self-contrastive "
                                                              "term")
    contrastive_dim: int = Field(256, ge=1, description="language-only phase: width of the contrastive features")

    @model_validator(mode="after")
    def _pformer_heads_divide_width(self) -> "PFormerConfig":
        if self.pformer_width % self.pformer_heads:
            raise ValueError(f"pformer_width {self.pformer_width} is not divisible by "
                             f"pformer_heads {self.pformer_heads}; "
                             "fix: pick pformer_heads that divide pformer_width")
        return self


class PFormerProjector(QFormerProjector):
    """Q-Former + linear whose output is aligned to a frozen P-Former's prompt for the target text (DLP).

    ``uses_text`` is True for the class and every instance (the target text feeds the
    alignment loss; the instruction is read too when ``instruction_aware`` is on).
    ``self.aux_loss`` is set on every forward: a scalar tensor when a target is given, else None.
    """

    name: ClassVar[str] = "pformer"
    Config: ClassVar[type[ComponentConfig]] = PFormerConfig
    tokens_doc: ClassVar[str] = "num_queries (32 by default), whatever the input token count"
    example_settings: ClassVar[dict[str, Any]] = {"num_queries": 4, "layers": 2, "width": 16, "heads": 2,
                                                  "cross_attention_every": 2, "pformer_layers": 1,
                                                  "pformer_width": 16, "pformer_heads": 2}
    uses_text: ClassVar[bool] = True

    def __init__(self, config: PFormerConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        assert config.out_dim is not None
        self.uses_text = True  # type: ignore[misc]
        self.pformer = QueryTransformer(config.num_queries, config.pformer_width, config.pformer_layers,
                                        config.pformer_heads, config.mlp_ratio, ctx.attention, text_dim=config.out_dim)
        self.pformer_proj = nn.Linear(config.pformer_width, config.out_dim)
        self.pformer_contrast = nn.Linear(config.pformer_width, config.contrastive_dim)  # language-only phase
        self.pformer_temp = nn.Parameter(torch.tensor(0.07))
        self.aux_loss: torch.Tensor | None = None

    def reference_prompt(self, target: torch.Tensor, target_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, L, out_dim) target embeddings -> (N, num_queries, out_dim): the P-Former's prompt (with gradients;
        the language-only phase trains it through this)."""
        return self.pformer_proj(self.pformer(None, target, target_mask))

    def language_phase(self, target: torch.Tensor, target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DLP's language-only phase on (N, L, out_dim) sentence embeddings with their (N, L) mask: the prompt
        (N, num_queries, out_dim) the frozen LLM is to reconstruct each sentence from, and the weighted
        self-contrastive loss (a scalar; 0 when ``contrastive_weight`` is 0). In training mode ``mask_ratio`` of each
        sentence's real tokens are hidden from the P-Former (at least one stays)."""
        config: PFormerConfig = self.config  # type: ignore[assignment]
        mask = target_mask.to(torch.bool)
        if self.training and config.mask_ratio > 0:
            kept = mask & (torch.rand(mask.shape, device=mask.device) >= config.mask_ratio)
            first = mask & (mask.long().cumsum(1) == 1)  # a sentence whose every token was drawn keeps its first
            mask = torch.where(kept.any(1, keepdim=True), kept, first)
        states = self.pformer(None, target, mask)  # (N, Q, pformer_width)
        prompt = self.pformer_proj(states)
        if config.contrastive_weight == 0:
            return prompt, prompt.new_zeros(())
        feats = F.normalize(self.pformer_contrast(states.mean(1)), dim=-1)
        sim = feats @ feats.T / self.pformer_temp.clamp(0.001, 0.5)
        own = torch.arange(len(feats), device=feats.device)
        return prompt, config.contrastive_weight * F.cross_entropy(sim.float(), own, label_smoothing=0.1)

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        out = super().forward(features, text)  # (N, num_queries, out_dim)
        self.aux_loss = None
        if text is None or text.target is None:
            return out
        config: PFormerConfig = self.config  # type: ignore[assignment]
        mask = text.target_mask
        if mask is None:
            mask = torch.ones(text.target.shape[:2], dtype=torch.bool, device=text.target.device)
        rows = mask.to(torch.bool).any(1)  # items with at least one real target token
        if not bool(rows.any()):
            return out
        with torch.no_grad():  # stop-gradient: the P-Former is a frozen teacher in this phase
            ref = self.reference_prompt(text.target[rows], mask[rows]).to(out.dtype)
        pred = out[rows]
        if config.align_loss == "mse":
            dist = F.mse_loss(pred, ref)
        else:
            dist = (1 - F.cosine_similarity(pred, ref, dim=-1)).mean()
        self.aux_loss = config.align_weight * dist
        return out
