"""DRESS's natural-language-feedback alignment (``objective: nlf``): the loss of a critique-and-refinement stage.

DRESS (Chen et al. 2023) aligns the model with natural-language feedback: conversations in which the model's reply
is followed by a critique (and a suggestion how to refine it) and then the refined reply. Training conditions on the
feedback: the refined reply is the target, the earlier reply and the feedback are context (DRESS's conditional
reinforcement learning on non-differentiable feedback, as likelihood training on the feedback-conditioned reply).
The data come as `mmhub.data.nlf` samples (earlier replies marked ``train: false``, so the processor leaves them out
of the labels); the batch builder skips samples without a feedback round (reason ``no_feedback_turn``).
"""

from __future__ import annotations

from typing import Any

import torch


class FeedbackRefinementLoss:
    """The wrapped next-token objective, counting the refined replies' tokens; it asks the batch builder to admit
    only conversations with a feedback round."""

    count_key = "refined_tokens"
    pairs = False
    needs_feedback = True

    def __init__(self, inner: Any):
        self.inner = inner

    def prepare(self, batch: dict[str, Any], ordered: list[Any]) -> None:
        self.inner.prepare(batch, ordered)

    def loss(self, model: Any, batch: dict[str, Any], stage: Any) -> tuple[torch.Tensor, int]:
        return self.inner.loss(model, batch, stage)

    def count(self, model: Any, batch: dict[str, Any]) -> int:
        return self.inner.count(model, batch)

    def stats(self) -> dict[str, float]:
        return self.inner.stats()
