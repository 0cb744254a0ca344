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
    position_ids: torch.Tensor  # (B, L'); (3, B, L') for grid (M-RoPE) positions (`inputs.grid_position_ids`)
    labels: torch.Tensor | None  # (B, L') or None
    origin: torch.Tensor | None = None  # (B, L') index of the input token each position came from (-1 = padding)
    media_positions: torch.Tensor | None = None  # (B, L') True where a media item's tokens were spliced in
    segment_ids: torch.Tensor | None = None  # (B, L') packed rows: the sample each position belongs to (-1 = padding)


def splice(input_ids: torch.Tensor, text_embeds: torch.Tensor, attention_mask: torch.Tensor,
           labels: torch.Tensor | None, media: dict[int, torch.Tensor], padding_side: str = "right",
           names: dict[int, str] | None = None, segment_ids: torch.Tensor | None = None,
           masks: dict[int, torch.Tensor] | None = None) -> Spliced:
    """Expand every placeholder id in `input_ids` into the rows of ``media[id]`` (N, T, H), in order.

    With ``masks[id]`` (N, T) bool (an encoder whose token count depends on the item pads it: AnyRes), item n
    expands into its True tokens only, in order, so each placeholder spans that item's own count.

    Items are consumed in row-major order of their placeholders: the n-th placeholder
    of a modality in the batch takes item n of that modality. With `segment_ids` (B, L)
    (packed rows, right padded: the sample of each token, -1 on padding), every spliced
    position takes its token's segment (media tokens their placeholder's) and position ids
    restart at 0 for each segment.
    """
    if segment_ids is not None:
        _check_packed(segment_ids, padding_side)
    B, _, H = text_embeds.shape  # (B, L, H)
    masks = masks or {}
    lens, is_media = _spans(input_ids, media, names, masks)
    ends = lens.cumsum(1)  # (B, L)
    starts = ends - lens
    new_len = ends[:, -1]  # (B,)
    total = int(new_len.max())
    if padding_side == "left":
        starts = starts + (total - new_len)[:, None]

    out = text_embeds.new_zeros(B, total, H)
    out_mask = attention_mask.new_zeros(B, total)
    out_labels = None if labels is None else labels.new_full((B, total), IGNORE)
    origin = input_ids.new_full((B, total), -1)
    media_positions = torch.zeros(B, total, dtype=torch.bool, device=input_ids.device)

    b, t = (~is_media).nonzero(as_tuple=True)
    pos = starts[b, t]
    out[b, pos] = text_embeds[b, t]
    out_mask[b, pos] = attention_mask[b, t]
    origin[b, pos] = t
    if out_labels is not None:
        out_labels[b, pos] = labels[b, t]

    for ph_id, feats in media.items():
        _place_media(input_ids, ph_id, feats, masks.get(ph_id), starts, attention_mask,
                     out, out_mask, origin, media_positions)

    seg = None
    if segment_ids is not None:
        seg = segment_ids.to(origin.device).gather(1, origin.clamp(min=0)).masked_fill(origin < 0, -1)
    position_ids = (out_mask.long().cumsum(1) - 1).clamp(min=0) if seg is None else segment_positions(seg)
    return Spliced(out, out_mask, position_ids, out_labels, origin, media_positions, seg)


def _check_packed(segment_ids: torch.Tensor, padding_side: str) -> None:
    prev, nxt = segment_ids[:, :-1], segment_ids[:, 1:]
    backwards = ((prev >= 0) & (nxt >= 0) & (nxt < prev)) | ((prev < 0) & (nxt >= 0))
    if padding_side != "right" or bool(backwards.any()):
        raise InputError("packed rows (segment_ids) must be right padded, each sample one run of its id in "
                         "increasing order (0, 1, 2..) and -1 only on the padding at the end")


def _place_media(input_ids: torch.Tensor, ph_id: int, feats: torch.Tensor, keep: torch.Tensor | None,
                 starts: torch.Tensor, attention_mask: torch.Tensor, out: torch.Tensor, out_mask: torch.Tensor,
                 origin: torch.Tensor, media_positions: torch.Tensor) -> None:
    """Write one modality's items (N, T, H) at their placeholders' spans (`keep` (N, T): only the True tokens)."""
    b, t = (input_ids == ph_id).nonzero(as_tuple=True)  # row-major = item order
    if b.numel() == 0:
        return
    T = feats.shape[1]
    keep = keep.to(feats.device) if keep is not None else None
    offset = torch.arange(T, device=starts.device).expand(len(b), T) if keep is None else keep.long().cumsum(1) - 1
    pos = starts[b, t][:, None] + offset  # (N, T)
    rows, cols = b[:, None].expand(-1, T), t[:, None].expand(-1, T)
    values = feats.to(out.dtype)
    if keep is not None:  # padded items: only their real tokens
        pos, rows, cols, values = pos[keep], rows[keep], cols[keep], values[keep]
    out[rows, pos] = values
    out_mask[rows, pos] = attention_mask[rows, cols]
    origin[rows, pos] = cols
    media_positions[rows, pos] = True


def _spans(input_ids: torch.Tensor, media: dict[int, torch.Tensor], names: dict[int, str] | None,
           masks: dict[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) positions each input token spans in the spliced sequence (T for a placeholder, its item's True count
    under `masks`, else 1) and where the placeholders are; raises when a placeholder's count differs from its
    items'."""
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
        if masks and ph_id in masks:  # row-major placeholder order = item order
            lens = lens.masked_scatter(hit, masks[ph_id].sum(1).to(lens))
        else:
            lens = torch.where(hit, torch.full_like(lens, feats.shape[1]), lens)
        is_media |= hit
    return lens, is_media


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) segment ids (each segment one contiguous run) -> position ids restarting at 0 at every run start."""
    B, L = segment_ids.shape
    idx = torch.arange(L, device=segment_ids.device).expand(B, L)
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return idx - torch.where(start, idx, torch.zeros_like(idx)).cummax(1).values


def compact(x: torch.Tensor, keep: torch.Tensor, fill: float | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the `keep` positions of each row to the front: (B, L, ...) -> (B, L_kept_max, ...), mask (B, L_kept_max).

    Order within a row is preserved; rows shorter than the longest are padded with `fill`
    (mask False). Used to split a spliced sequence into an encoder-decoder model's encoder
    and decoder sides, and to gather a sample's instruction text for text-reading projectors.
    """
    B = keep.shape[0]
    n_max = max(int(keep.sum(1).max()) if keep.numel() else 0, 1)
    pos = keep.long().cumsum(1) - 1  # (B, L)
    out = x.new_full((B, n_max, *x.shape[2:]), fill)
    mask = torch.zeros(B, n_max, dtype=torch.bool, device=keep.device)
    b, t = keep.nonzero(as_tuple=True)
    out[b, pos[b, t]] = x[b, t]
    mask[b, pos[b, t]] = True
    return out, mask
