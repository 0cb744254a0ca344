"""Splicing projected media tokens into the text embedding sequence at placeholder tokens.

Each placeholder token (one id per modality) expands in place into that item's
T projected tokens. Everything is done with index arithmetic on the whole batch
(no per-sample Python loop): a cumulative sum of per-token lengths gives every
token's position in the expanded sequence. Placeholder and padding positions get
label -100 so they never count in the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmhub.errors import InputError

IGNORE = -100


@dataclass
class Spliced:
    """Backbone-ready inputs."""

    inputs_embeds: torch.Tensor  # (B, L', H)
    attention_mask: torch.Tensor  # (B, L')
    position_ids: torch.Tensor  # (B, L')
    labels: torch.Tensor | None  # (B, L') or None


def splice(
    input_ids: torch.Tensor,
    text_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    media: dict[int, torch.Tensor],
    padding_side: str = "right",
    names: dict[int, str] | None = None,
) -> Spliced:
    """Expand every placeholder id in `input_ids` into the rows of ``media[id]`` (N, T, H), in order.

    Items are consumed in row-major order of their placeholders: the n-th placeholder
    of a modality in the batch takes item n of that modality.
    """
    B, L, H = text_embeds.shape  # (B, L, H)
    lens = torch.ones_like(input_ids)
    is_media = torch.zeros_like(input_ids, dtype=torch.bool)
    for ph_id, feats in media.items():
        hit = input_ids == ph_id
        n_ph, n_items = int(hit.sum()), feats.shape[0]
        if n_ph != n_items:
            name = (names or {}).get(ph_id, f"id {ph_id}")
            per_row = hit.sum(1).tolist()
            raise InputError(f"{name} placeholders and items do not match: {n_ph} placeholder(s) in the batch "
                             f"(per sample: {per_row}) but {n_items} item(s) given. Put one {name} marker in the text "
                             f"for each item.")
        lens = torch.where(hit, torch.full_like(lens, feats.shape[1]), lens)
        is_media |= hit
    ends = lens.cumsum(1)  # (B, L)
    starts = ends - lens
    new_len = ends[:, -1]  # (B,)
    total = int(new_len.max())
    if padding_side == "left":
        starts = starts + (total - new_len)[:, None]

    out = text_embeds.new_zeros(B, total, H)
    out_mask = attention_mask.new_zeros(B, total)
    out_labels = None if labels is None else labels.new_full((B, total), IGNORE)

    b, t = (~is_media).nonzero(as_tuple=True)
    pos = starts[b, t]
    out[b, pos] = text_embeds[b, t]
    out_mask[b, pos] = attention_mask[b, t]
    if out_labels is not None:
        out_labels[b, pos] = labels[b, t]

    for ph_id, feats in media.items():
        b, t = (input_ids == ph_id).nonzero(as_tuple=True)  # row-major = item order
        if b.numel() == 0:
            continue
        T = feats.shape[1]
        pos = starts[b, t][:, None] + torch.arange(T, device=pos.device)  # (N, T)
        out[b[:, None].expand(-1, T), pos] = feats.to(out.dtype)
        out_mask[b[:, None].expand(-1, T), pos] = attention_mask[b, t][:, None].expand(-1, T)

    position_ids = (out_mask.long().cumsum(1) - 1).clamp(min=0)
    return Spliced(out, out_mask, position_ids, out_labels)
