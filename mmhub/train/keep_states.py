"""Keeping a reference model's hidden states: feature distillation added to a stage's next-token loss.

A stage with ``keep_states: {reference: runs/base/model, weight: 1.0, positions: media}`` adds to its loss, per
target token, ``weight`` times the mean over the chosen positions and over every transformer block but the last of

    ||h - h_ref||^2 / ||h_ref||^2

where ``h`` is the model's output of that block and ``h_ref`` the frozen reference's on the same batch. The last
block is left out: its output at a prompt position is read by nothing but that position's own logits (and the
step's last-layer MLP may run at labelled positions only, `mmhub.losses.only_labelled`); every block before it is
what later positions attend to. ``positions: media`` keeps the states where a media item's tokens sit: the update
leaves how the model reads its images alone and changes only how it answers, which is what a specialist merged later
with another one needs (its update is silent on the activations the other skill's answers are computed from;
docs/merging.md, "Specialists that keep the base's hidden states"). ``positions: prompt`` keeps every unlabelled
real position.

With ``data`` (anchor samples: the other skill's questions, say) the states are kept on those instead: each training
micro-batch is paired with one anchor micro-batch (``batch_size``, default the stage's, drawn in an order seeded by
the spec's seed, cycling; a resumed stage starts that order again), the model and the reference run on it at
``positions`` (``all``: every real position), and the training batch gets the next-token loss alone. A specialist
trained so is silent on the other skill's questions: merged with that skill's specialist, it leaves those answers to
it.

The reference runs in inference mode, on the batch's media or on the model's cached encoder features when the
reference's encoder for that modality is the model's (checked once; otherwise the stage must not cache features).
Both models must splice a batch into the same positions: a different token count per item is an error naming both
lengths.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmhub.backbones.layers import transformer_blocks
from mmhub.errors import InputError, MMHubError
from mmhub.spec import KeepStatesSpec, StageSpec


def blocks_of(model: Any) -> nn.ModuleList:
    """The model's decoder blocks (an error naming the backbone when it has none to find)."""
    n = int(model.plan.backbone_facts.num_layers or 0)
    try:
        return transformer_blocks(model.backbone, n)
    except ValueError as exc:
        raise MMHubError(f"keep_states: {exc}") from None


def load_reference(spec: KeepStatesSpec, stage: StageSpec, model: Any) -> Any:
    """The frozen reference model of a stage's ``keep_states`` (a folder path or a preset name), checked against the
    model: a decoder-only backbone with the same hidden size and block count, and the same encoder for every modality
    whose features the stage caches."""
    from mmhub.model import MMModel

    where = Path(spec.reference)
    try:
        ref = MMModel.from_pretrained(str(where) if where.exists() else spec.reference)
    except MMHubError as exc:
        raise InputError(f"stage {stage.name!r}: keep_states.reference {spec.reference!r} could not be loaded: "
                         f"{exc}") from None
    ref = ref.eval().requires_grad_(False).to(model.device)
    if model.is_encoder_decoder or ref.is_encoder_decoder:
        raise InputError(f"stage {stage.name!r}: keep_states needs decoder-only backbones (the model or "
                         f"{spec.reference!r} is encoder-decoder); drop keep_states")
    mine, theirs = model.plan.backbone_facts, ref.plan.backbone_facts
    if (mine.hidden_size, mine.num_layers) != (theirs.hidden_size, theirs.num_layers):
        raise InputError(f"stage {stage.name!r}: keep_states.reference {spec.reference!r} has {theirs.num_layers} "
                         f"blocks of width {theirs.hidden_size}, the model {mine.num_layers} of width "
                         f"{mine.hidden_size}; name a reference with the model's backbone (the base it started from)")
    if stage.cache_features:
        for m, enc in model.encoders.items():
            if not _same_weights(enc, ref.encoders[m] if m in ref.encoders else None):
                raise InputError(f"stage {stage.name!r}: keep_states.reference {spec.reference!r} encodes {m!r} "
                                 f"differently from the model, and the stage caches the model's {m} features; set "
                                 f"cache_features: false so the reference encodes the media itself")
    return ref


def _same_weights(a: nn.Module, b: nn.Module | None) -> bool:
    if b is None:
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu())
                                          for k in sa)


def _selected(spliced: Any, positions: str) -> torch.Tensor:
    """(B, L') True at the positions whose states are kept."""
    real = spliced.attention_mask.bool()
    if positions == "all":
        return real
    if positions == "media":
        if spliced.media_positions is None:
            return torch.zeros_like(real)
        return spliced.media_positions.bool() & real
    if spliced.labels is None:
        return real
    return real & (spliced.labels == -100)


@contextmanager
def _recorded(blocks: nn.ModuleList, at: torch.Tensor, out: dict[int, torch.Tensor]) -> Iterator[None]:
    """While active, the first output of every block but the last, at `at` (B, L'), goes to ``out[index]`` (a
    block run again, as activation checkpointing does in the backward pass, is not recorded twice)."""

    def hook(index: int):
        def record(_module: nn.Module, _args: Any, output: Any) -> None:
            if index in out:
                return
            h = output[0] if isinstance(output, tuple) else output
            if h.shape[:2] != at.shape:
                raise MMHubError(f"keep_states: block {index} ran on {tuple(h.shape[:2])} positions and the reference "
                                 f"on {tuple(at.shape)}; the model and keep_states.reference must splice each media "
                                 "item into as many tokens (same encoders and projectors' token counts)")
            out[index] = h[at.to(h.device)]
        return record

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks) if i < len(blocks) - 1]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Anchors:
    """The anchor samples of ``keep_states.data``: micro-batches drawn in a seeded order, cycling; a sample that
    cannot be read or encoded is skipped and counted (``skipped``)."""

    def __init__(self, spec: KeepStatesSpec, stage: StageSpec, seed: int):
        from mmhub.data import load_dataset

        try:
            self.data = load_dataset(spec.data)
        except MMHubError as exc:
            raise InputError(f"stage {stage.name!r}: keep_states.data: {exc}") from None
        if self.data.streaming or len(self.data) == 0:
            raise InputError(f"stage {stage.name!r}: keep_states.data must be a map-style dataset with samples "
                             f"({self.data.source}); list them in a JSON/JSONL file or set samples: N")
        self.size = spec.batch_size or stage.batch_size
        self.order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(seed)).tolist()
        self.at, self.skipped, self.stage = 0, 0, stage.name

    def batch(self, model: Any) -> dict[str, Any]:
        """The next micro-batch, collated by the model's processor (media encoded by the models themselves)."""
        encs, tries = [], 0
        while len(encs) < self.size and tries < 4 * self.size:
            index = self.order[self.at % len(self.order)]
            self.at, tries = self.at + 1, tries + 1
            try:
                sample = self.data[index]
                encs.append(model.processor.encode(sample.messages, sample.media))
            except (InputError, OSError, ValueError, KeyError, IndexError):
                self.skipped += 1
        if not encs:
            raise InputError(f"stage {self.stage!r}: keep_states.data: none of {tries} anchor samples in a row could "
                             f"be read ({self.skipped} skipped in all); check the dataset's media files")
        batch = model.processor.collate(encs)
        batch["features"] = {}
        return batch


class KeepStates:
    """Wraps an objective: its loss plus ``weight`` x the mean relative squared distance of the model's block outputs
    to the reference's at the kept positions, per counted target (see the module docstring). ``stats`` reports the
    distance as ``keep_states``."""

    def __init__(self, inner: Any, reference: Any, spec: KeepStatesSpec, anchors: Anchors | None = None):
        self.inner, self.reference, self.spec, self.anchors = inner, reference, spec, anchors
        self.count_key, self.pairs = inner.count_key, inner.pairs
        self._sum, self._n = 0.0, 0

    def prepare(self, batch: dict[str, Any], ordered: list[Any]) -> None:
        self.inner.prepare(batch, ordered)

    @torch.no_grad()
    def reference_states(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The kept positions (B, L') and the reference's block outputs there, per block index."""
        from mmhub import inputs, passes

        ref = self.reference
        prep = inputs.prepare(ref, batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"],
                              "right", batch.get("features"), batch.get("segment_ids"))
        at = _selected(prep.spliced, self.spec.positions)
        states: dict[int, torch.Tensor] = {}
        with _recorded(blocks_of(ref), at, states):
            passes.decoder_only(ref, prep, all_states=True)
        return at, states

    def loss(self, model: Any, batch: dict[str, Any], stage: Any) -> tuple[torch.Tensor, int]:
        mine: dict[int, torch.Tensor] = {}
        blocks = blocks_of(getattr(model, "module", model))
        if self.anchors is None:
            at, kept = self.reference_states(batch)
            with _recorded(blocks, at, mine):
                total, count = self.inner.loss(model, batch, stage)
        else:  # the training batch as it is, and the states kept on an anchor micro-batch
            total, count = self.inner.loss(model, batch, stage)
            anchor = self.anchors.batch(getattr(model, "module", model))
            at, kept = self.reference_states(anchor)
            with _recorded(blocks, at, mine):
                model(anchor["input_ids"], anchor["attention_mask"], None, anchor["media"], return_logits=False)
        if not kept or int(at.sum()) == 0:
            return total, count
        dist = torch.stack([((mine[i].float() - r.float()).pow(2).sum(-1) / r.float().pow(2).sum(-1).clamp_min(1e-12))
                            .mean() for i, r in kept.items()]).mean()
        self._sum += float(dist.detach())
        self._n += 1
        return total + self.spec.weight * dist * count, count

    def count(self, model: Any, batch: dict[str, Any]) -> int:
        return self.inner.count(model, batch)

    def stats(self) -> dict[str, float]:
        out = dict(self.inner.stats())
        if self._n:
            out["keep_states"] = self._sum / self._n
        if self.anchors is not None and self.anchors.skipped:
            out["keep_states_skipped"] = float(self.anchors.skipped)
        self._sum, self._n = 0.0, 0
        return out


__all__ = ["Anchors", "KeepStates", "blocks_of", "load_reference"]
