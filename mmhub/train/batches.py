"""From sample indices to collated micro-batches: tokenize, read media (or cached features), pack or pad.

A sample that cannot be used (unreadable media, every label masked, no assistant turn) is
skipped and counted in `BadSamples`, with a warning naming the sample's index, id and what is wrong
(the first ``MAX_WARNINGS`` per reason); past the stage's ``max_bad_fraction`` the run stops with
the counts and examples. A conversation without an assistant turn (it would add nothing but a zero
loss) and text the tokenizer cannot take (half a UTF-16 surrogate pair) are such samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmhub.data.nlf import has_feedback
from mmhub.errors import InputError
from mmhub.packing import collate_packed, pack, spliced_length
from mmhub.spec import StageSpec
from mmhub.splice import IGNORE
from mmhub.train.feature_cache import FeatureCache, item_key
from mmhub.train.objectives import Objective

MAX_EXAMPLES = 3
MAX_WARNINGS = 10  # per reason; later skips of that reason are only counted


class NoAssistantTurn(InputError):
    """A training conversation has no assistant turn: nothing to learn from it."""


class NoFeedbackTurn(InputError):
    """An ``objective: nlf`` stage's conversation has no feedback round (context reply, feedback, refined reply)."""


def printable(text: str) -> str:
    """`text` with any lone surrogate escaped (``\\ud800``), so printing or logging it cannot fail."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class BadSamples:
    """Skipped samples, counted per reason, with the first examples kept for the error message."""

    limit_fraction: float
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    seen: int = 0

    @staticmethod
    def reason(exc: Exception) -> str:
        if isinstance(exc, NoFeedbackTurn):
            return "no_feedback_turn"
        return "no_assistant_turn" if isinstance(exc, NoAssistantTurn) else type(exc).__name__

    def add(self, where: str, exc: Exception) -> None:
        reason = self.reason(exc)
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(printable(f"{where}: {exc}"))
        total = sum(self.counts.values())
        if self.seen >= 20 and total > self.limit_fraction * self.seen:
            raise InputError(f"{total} of {self.seen} samples so far could not be used ({self.counts}), more than "
                             f"max_bad_fraction {self.limit_fraction}; e.g. {' | '.join(self.examples)}. Fix the data "
                             "or raise the stage's max_bad_fraction.")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class BatchBuilder:
    """Encodes a stage's samples into the micro-batches of one optimizer step (this process's share)."""

    def __init__(self, model: Any, data: Any, stage: StageSpec, objective: Objective, caches: dict[str, FeatureCache],
                 bad: BadSamples, world: int, rank: int, warn: Callable[[str], None]):
        self.model, self.data, self.stage, self.objective = model, data, stage, objective
        self.caches, self.bad, self.world, self.rank, self.warn = caches, bad, world, rank, warn

    def step(self, step_ids: list[int]) -> tuple[list[dict[str, Any]], int]:
        """The micro-batches of one optimizer step over `step_ids` (all processes'), and the samples they use."""
        st, per = self.stage, self.stage.batch_size * self.world
        batches, used = [], 0
        for k in range(st.grad_accum):
            mine = step_ids[k * per:(k + 1) * per][self.rank * st.batch_size:(self.rank + 1) * st.batch_size]
            encs = self.features(self.encode(mine))
            if self.objective.pairs:  # a pair whose other half was dropped is dropped too
                idx = [e.index for e in encs]
                encs = [e for e in encs if idx.count(e.index) == 2]
            if not encs:
                continue
            batches.append(self.collate(encs))
            used += len(encs)
        return batches, used

    def collate(self, encs: list[Any]) -> dict[str, Any]:
        """Pad (or pack, when the stage packs and the objective allows) encodings into one batch."""
        st, caches = self.stage, self.caches
        if st.pack and not self.objective.pairs:
            rows = pack(encs, st.pack, spliced_length(self.model))
            batch = collate_packed(self.model.processor, encs, rows)
            ordered = [encs[i] for row in rows for i in row]
        else:
            batch = self.model.processor.collate(encs)
            ordered = encs
        batch["features"] = {m: torch.cat([e.features[m] for e in ordered if m in getattr(e, "features", {})])
                             for m in caches if any(m in getattr(e, "features", {}) for e in ordered)}
        self.objective.prepare(batch, ordered)
        return batch

    def encode(self, ids: Sequence[int]) -> list[Any]:
        """Tokenize samples (pairs: chosen then rejected conversation per sample); bad ones are skipped and counted."""
        out = []
        for i in ids:
            self.bad.seen += 1
            where = f"sample {i}"
            try:
                sample = self.data[i]
                where = f"sample {i} (id {getattr(sample, 'id', None)!r})"
                out.extend(self._encode_one(i, sample))
            except (InputError, OSError, ValueError, KeyError, IndexError) as exc:
                if self.bad.counts.get(self.bad.reason(exc), 0) < MAX_WARNINGS:
                    self.warn(printable(f"warning: skipped {where}: {exc}"))
                self.bad.add(where, exc)
        return out

    def _encode_one(self, i: int, sample: Any) -> list[Any]:
        proc, caches = self.model.processor, self.caches
        if self.objective.pairs:
            if sample.chosen is None or sample.rejected is None:
                raise InputError("a DPO stage needs preference samples (prompt + chosen + rejected)")
            convs = [sample.conversation(sample.chosen), sample.conversation(sample.rejected)]
        else:
            convs = [sample.messages]
            if not any(m.get("role") == "assistant" for m in sample.messages):
                raise NoAssistantTurn(f"sample id {sample.id!r} has no assistant turn ({len(sample.messages)} "
                                      "message(s), roles " + ", ".join(str(m.get("role")) for m in sample.messages)
                                      + "): its loss would be 0; add the assistant's reply or drop the sample")
            if getattr(self.objective, "needs_feedback", False) and not has_feedback(sample.messages):
                raise NoFeedbackTurn(f"sample id {sample.id!r} has no feedback round (an assistant reply marked "
                                     "train: false, the user's critique, then the refined reply), which an nlf stage "
                                     "trains on; give it as nlf data (`type: nlf`) or train it in an sft stage")
        pair = []
        for conv in convs:
            enc = proc.encode(conv, sample.media, index=i, preprocess=False)
            if not getattr(self.objective, "reads_media", True):  # a text-only objective: media never load
                enc.media = {}
            for m, items in enc.media.items():
                if m in caches:
                    enc.media[m] = [("key", item_key(x), x) for x in items]
                else:
                    enc.media[m] = [proc.preprocess[m](x) for x in items]
            if all(label == IGNORE for label in enc.labels):
                raise InputError(f"every label of sample id {sample.id!r} is masked (no assistant tokens to learn)")
            enc.index = i
            enc.outputs = sample.outputs or None
            pair.append(enc)
        return pair

    def features(self, encs: list[Any]) -> list[Any]:
        """Cached encoder features for the batch; a sample whose uncached media fail to load is dropped and counted."""
        model, proc, caches = self.model, self.model.processor, self.caches
        pixels: dict[tuple[str, str], torch.Tensor] = {}
        keep = []
        for enc in encs:
            try:
                for m in caches:
                    for _, key, raw in enc.media.get(m, []):
                        if not caches[m].has(key) and (m, key) not in pixels:
                            pixels[(m, key)] = proc.preprocess[m](raw)
                keep.append(enc)
            except (InputError, OSError, ValueError) as exc:
                self.bad.add(f"sample {enc.index}", exc)
        for m, cache in caches.items():
            keys = [key for enc in keep for _, key, _ in enc.media.get(m, [])]
            if not keys:
                continue

            def compute(missing: list[int], _m: str = m, _keys: list[str] = keys) -> torch.Tensor:
                batch = torch.stack([pixels[(_m, _keys[j])] for j in missing])
                with torch.no_grad():
                    return model.encode_features({_m: batch})[_m]

            stacked = cache.get(keys, compute)
            at = 0
            for enc in keep:
                k = len(enc.media.pop(m, []))
                enc.features = {**getattr(enc, "features", {}), m: stacked[at:at + k]}
                at += k
        return keep
