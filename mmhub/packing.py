"""Sequence packing and length-grouped batching: less padding per batch.

* `pack` groups samples into rows whose spliced length (text tokens plus media tokens)
  fits ``max_len`` (first-fit-decreasing); `collate_packed` lays each row out as one
  right-padded sequence with ``segment_ids`` (0, 1, 2.. per sample, -1 on padding).
  `MMModel.forward(..., segment_ids=...)` then keeps attention causal *within* each
  sample (a block-diagonal causal mask; xformers' ``BlockDiagonalCausalMask`` on CUDA),
  restarts position ids per sample and never lets the last token of a sample predict the
  first token of the next one, so the loss equals that of the unpacked batch.
* `length_grouped_order` orders samples LLaVA-style (shuffle, then sort by length within
  mega-batches) so that consecutive batches hold samples of similar length.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, Sequence

import torch

from mmhub.errors import InputError
from mmhub.processor import Encoded, MMProcessor
from mmhub.splice import IGNORE

log = logging.getLogger(__name__)


def spliced_length(model: Any) -> Callable[[Encoded], int]:
    """The ``tokens_of`` for `pack`: a sample's length after each placeholder expands into its item's tokens
    (``model.plan.tokens_per_item``; one marker token for modalities an injector takes as context)."""
    extra = {model.processor.placeholder_ids[m]: model.plan.tokens_per_item(m) - 1 for m in model.modalities}

    def tokens_of(sample: Encoded) -> int:
        return len(sample.input_ids) + sum(extra.get(t, 0) for t in sample.input_ids)

    return tokens_of


def pack(samples: Sequence[Encoded], max_len: int, tokens_of: Callable[[Encoded], int]) -> list[list[int]]:
    """Group sample indices into rows whose total ``tokens_of`` fits `max_len`: first-fit-decreasing.

    Deterministic: samples are placed longest first (ties by index), each into the first row
    with room; indices within a row are in ascending order. A sample longer than `max_len`
    gets a row of its own (logged), it is never truncated.
    """
    if max_len < 1:
        raise InputError(f"max_len must be >= 1, got {max_len}")
    lengths = [int(tokens_of(s)) for s in samples]
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        if n > max_len:
            log.warning("pack: sample %d has %d tokens > max_len %d; it gets a row of its own", i, n, max_len)
            rows.append([i])
            room.append(0)
            continue
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_len - n)
    return [sorted(r) for r in rows]


def collate_packed(processor: MMProcessor, samples: Sequence[Encoded], rows: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Concatenate the samples of each row into one right-padded sequence.

    Returns what `MMProcessor.collate` returns (input_ids, attention_mask, labels, media,
    padding_side="right") plus ``segment_ids`` (B, L) long: 0, 1, 2.. for the samples of a
    row in the order given, -1 on padding. Media items are stacked in row-major
    placeholder order, the order the splice consumes them in.
    """
    if not rows or any(not r for r in rows):
        raise InputError("collate_packed needs at least one row and no empty rows")
    seen = [i for r in rows for i in r]
    if len(set(seen)) != len(seen) or not all(0 <= i < len(samples) for i in seen):
        raise InputError(f"rows must name each of the {len(samples)} samples at most once, got {list(map(list, rows))}")
    longest = max(sum(len(samples[i].input_ids) for i in r) for r in rows)
    B = len(rows)
    ids = torch.full((B, longest), processor.pad_id, dtype=torch.long)
    mask = torch.zeros((B, longest), dtype=torch.long)
    labels = torch.full((B, longest), IGNORE, dtype=torch.long)
    segs = torch.full((B, longest), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        at = 0
        for k, i in enumerate(r):
            s = samples[i]
            n = len(s.input_ids)
            ids[b, at:at + n] = torch.tensor(s.input_ids, dtype=torch.long)
            labels[b, at:at + n] = torch.tensor(s.labels, dtype=torch.long)
            mask[b, at:at + n] = 1
            segs[b, at:at + n] = k
            at += n
    media: dict[str, torch.Tensor] = {}
    for m in processor.placeholders:
        items = [t for r in rows for i in r for t in samples[i].media.get(m, [])]
        if items:  # items preprocessed to different shapes stay a list, as in MMProcessor.collate
            media[m] = torch.stack(items) if all(t.shape == items[0].shape for t in items) else items
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "media": media, "padding_side": "right",
            "segment_ids": segs}


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) segment ids -> (B, 1, L, L) bool, True = attend: causal within a segment, nothing across segments.

    Padding (-1, a run at the end of a right-padded row) is a causal segment of its own, so no
    query row is empty.
    """
    L = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal)[:, None]


def segment_lengths(segment_ids: torch.Tensor) -> list[int]:
    """Lengths of the runs of equal ids, row by row (runs never cross rows): the seqlens of a block-diagonal
    causal mask over the flattened (1, B*L) batch."""
    B, L = segment_ids.shape
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    at = start.reshape(-1).nonzero().squeeze(1)
    return torch.diff(at, append=torch.tensor([B * L], device=at.device)).tolist()


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, mega_batch: int = 50) -> list[int]:
    """LLaVA-style length-grouped sampling order: a seeded shuffle, then each mega-batch of
    ``mega_batch * batch_size`` indices sorted by length (longest first), so consecutive batches of
    `batch_size` hold samples of similar length while the order across mega-batches stays random.
    A permutation of ``range(len(lengths))``, the same for the same seed."""
    if batch_size < 1 or mega_batch < 1:
        raise InputError(f"batch_size and mega_batch must be >= 1, got {batch_size} and {mega_batch}")
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    size = batch_size * mega_batch
    out: list[int] = []
    for start in range(0, len(order), size):
        out += sorted(order[start:start + size], key=lambda i: -lengths[i])  # stable: ties keep the shuffled order
    return out
