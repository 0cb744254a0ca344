"""Training objectives: what one micro-batch's loss is, as small objects the one training loop calls.

An objective turns a collated batch into ``(summed loss, count)``: the loss summed over what
it counts (target tokens, preference pairs, images), so the loop can divide the optimizer
step's gradient by the global count. ``stats()`` gives extra numbers for the step's metrics
record, ``count_key`` names the count there. An objective that can tell the count from the collated batch alone,
before the forward, defines ``count(model, batch)``: the DeepSpeed loop needs it (`mmhub.train.deepspeed`).

* `NextTokenLoss` (``objective: sft``): cross-entropy on the assistant tokens;
* `PreferenceLoss` (``objective: dpo``): sigmoid DPO against a frozen reference copy of the model;
* `OutputAlignment`: wraps either of them for models with an output side, adding each sample's
  output captions to the batch so the forward adds the decoding-side alignment loss;
* `DiffusionLoss`: a generator's own denoising loss on (pixels, caption ids) batches;
* `Blip2QFormerLoss` (``objective: blip2_qformer``, `mmhub.train.blip2_qformer`): BLIP-2's first stage;
* `PFormerLanguageLoss` (``objective: pformer``, `mmhub.train.pformer_phase`): DLP's language-only phase;
* `FeedbackRefinementLoss` (``objective: nlf``, `mmhub.train.nlf`): DRESS's natural-language-feedback alignment.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from mmhub.spec import StageSpec
from mmhub.train.blip2_qformer import Blip2QFormerLoss
from mmhub.train.nlf import FeedbackRefinementLoss
from mmhub.train.pformer_phase import PFormerLanguageLoss


class Objective(Protocol):
    """What the training loop needs from an objective."""

    count_key: str  # the metrics name of the count `loss` returns
    pairs: bool  # encode every sample twice (chosen, then rejected reply)

    def prepare(self, batch: dict[str, Any], ordered: list[Any]) -> None:
        """Add objective-specific inputs to a collated batch (`ordered`: its samples' encodings, in row order)."""

    def loss(self, model: Any, batch: dict[str, Any], stage: Any) -> tuple[torch.Tensor, int]:
        """(summed loss, count) of one micro-batch; the loop backpropagates the sum."""

    def stats(self) -> dict[str, float]:
        """Extra numbers for the metrics record of the last step."""


def count_targets(model: Any, labels: torch.Tensor) -> int:
    """The target tokens `MMModel.forward` will count in a collated batch: labelled positions after the first of each
    row for decoder-only models (position t predicts t + 1; media placeholders expand to unlabelled positions), every
    labelled position for encoder-decoder ones."""
    from mmhub.splice import IGNORE

    return int((labels != IGNORE).sum()) if model.is_encoder_decoder else int((labels[:, 1:] != IGNORE).sum())


def forward(model: Any, batch: dict[str, Any]) -> Any:
    """The training forward over a collated batch (loss only, no logits)."""
    return model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"], return_logits=False,
                 features=batch["features"], segment_ids=batch.get("segment_ids"), outputs=batch.get("outputs"))


class NextTokenLoss:
    """Next-token cross-entropy on assistant tokens, summed over the micro-batch's target tokens (plus a
    mixture-of-experts backbone's router loss, which `stats` reports as ``router_loss``, per target token)."""

    count_key = "target_tokens"
    pairs = False

    def __init__(self) -> None:
        self._router = [0.0, 0]  # router loss x target tokens, target tokens: since the last `stats`

    def prepare(self, batch: dict[str, Any], ordered: list[Any]) -> None:
        pass

    def loss(self, model: Any, batch: dict[str, Any], stage: StageSpec) -> tuple[torch.Tensor, int]:
        out = forward(model, batch)
        if out.router_loss is not None:
            self._router[0] += float(out.router_loss.detach()) * out.num_target_tokens
            self._router[1] += out.num_target_tokens
        return out.loss.float() * out.num_target_tokens, out.num_target_tokens

    def count(self, model: Any, batch: dict[str, Any]) -> int:
        return count_targets(model, batch["labels"])

    def stats(self) -> dict[str, float]:
        (total, n), self._router = self._router, [0.0, 0]
        return {"router_loss": total / n} if n else {}


class PreferenceLoss:
    """Sigmoid DPO: -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))), summed over pairs.

    Rows alternate chosen, rejected; `reference` is a frozen copy of the model as the stage begins."""

    count_key = "pairs"
    pairs = True

    def __init__(self, reference: torch.nn.Module):
        self.reference = reference
        self._stats: dict[str, float] = {}

    def prepare(self, batch: dict[str, Any], ordered: list[Any]) -> None:
        pass

    def loss(self, model: Any, batch: dict[str, Any], stage: StageSpec) -> tuple[torch.Tensor, int]:
        out = forward(model, batch)
        with torch.no_grad():
            ref = self.reference(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"],
                                 return_logits=False, features=batch["features"]).sequence_logprobs
        pc, pr = _pairs(out.sequence_logprobs)
        rc, rr = _pairs(ref)
        margin = stage.beta * ((pc - rc) - (pr - rr))
        self._stats = {"reward_margin": float(margin.mean().detach()) / stage.beta,
                       "reward_accuracy": float((margin > 0).float().mean())}
        return -torch.nn.functional.logsigmoid(margin).sum(), int(margin.numel())

    def count(self, model: Any, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].shape[0]) // 2  # rows alternate chosen, rejected

    def stats(self) -> dict[str, float]:
        return dict(self._stats)


class OutputAlignment:
    """Decoding-side alignment for models with output projectors: the batch carries each sample's output captions
    (one per signal group, in row order), and the forward adds the MSE of the projected signal states against the
    generator's text features of those captions to the wrapped objective's loss."""

    def __init__(self, inner: Objective, modalities: list[str]):
        self.inner = inner
        self.modalities = modalities
        self.count_key = inner.count_key
        self.pairs = inner.pairs
        self.needs_feedback = getattr(inner, "needs_feedback", False)

    def prepare(self, batch: dict[str, Any], ordered: list[Any]) -> None:
        self.inner.prepare(batch, ordered)
        batch["outputs"] = {m: [c for e in ordered for c in (e.outputs or {}).get(m, [])] for m in self.modalities}

    def loss(self, model: Any, batch: dict[str, Any], stage: Any) -> tuple[torch.Tensor, int]:
        return self.inner.loss(model, batch, stage)

    def count(self, model: Any, batch: dict[str, Any]) -> int:
        return self.inner.count(model, batch)

    def stats(self) -> dict[str, float]:
        return self.inner.stats()


class DiffusionLoss:
    """A generator's denoising loss (its batch mean) on ``{"pixels", "ids", "generator"}`` batches; counts 1 per batch,
    so the optimizer step follows the batch mean."""

    count_key = "batches"
    pairs = False

    def prepare(self, batch: dict[str, Any], ordered: list[Any]) -> None:
        pass

    def loss(self, model: Any, batch: dict[str, Any], stage: Any) -> tuple[torch.Tensor, int]:
        return model.loss(batch["pixels"], batch["ids"], generator=batch["generator"],
                          edge_weight=float(batch.get("edge_weight", 0.0))), 1

    def count(self, model: Any, batch: dict[str, Any]) -> int:
        return 1

    def stats(self) -> dict[str, float]:
        return {}


def objective_for(stage: StageSpec, model: Any, reference: torch.nn.Module | None = None) -> Objective:
    """The objective a stage names (``sft`` / ``dpo`` / ``blip2_qformer``), plus the output-side alignment when the
    model makes media (not for blip2_qformer, which does not run the LLM)."""
    if stage.objective == "blip2_qformer":
        return Blip2QFormerLoss(model, stage)
    if stage.objective == "pformer":  # text alone through the frozen LLM: no output side either
        return PFormerLanguageLoss(model, stage)
    inner: Objective = PreferenceLoss(reference) if stage.objective == "dpo" else NextTokenLoss()
    if stage.objective == "nlf":  # DRESS: the refined replies of feedback conversations
        inner = FeedbackRefinementLoss(inner)
    if len(model.output_projectors):
        return OutputAlignment(inner, list(model.output_projectors))
    return inner


def _pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[0::2], x[1::2]  # rows alternate chosen, rejected
