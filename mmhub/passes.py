"""The backbone pass of `MMModel.forward`: final hidden states, targets and which of them are labelled.

* `decoder_only`: one causal sequence per row (a prefix-LM backbone reads the prompt bidirectionally:
  `prefix_lm_mask`), or packed rows under a block-diagonal mask with per-sample positions (`mmhub.packing`,
  segment-wise attention), injectors active; the backbone's `only_at` may skip work where no label is read
  (`mmhub.losses.only_labelled`);
* `encoder_decoder`: the prompt side (media tokens included) feeds the encoder, the labelled tokens the
  decoder (teacher-forced behind the backbone's ``decoder_start_token_id``).
"""

from __future__ import annotations

from typing import Any

import torch

from mmhub.hf_attention import HF_SDPA, packed_sequences
from mmhub.inputs import Prepared, injected
from mmhub.losses import only_labelled
from mmhub.packing import block_causal_mask, segment_lengths
from mmhub.splice import IGNORE, Spliced, compact


def decoder_only(model: Any, prep: Prepared, all_states: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Decoder-only backbones: final hidden states (B, L', H), targets (B, L'-1) and where they are labelled."""
    sp = prep.spliced
    if sp.segment_ids is not None and sp.labels is not None:
        # packed rows: the last token of sample k never predicts the first token of sample k+1
        sp.labels = sp.labels.masked_fill(sp.position_ids == 0, IGNORE)
    target = keep = None
    if sp.labels is not None:
        target = sp.labels[:, 1:]  # token t predicts t+1
        keep = target != IGNORE
    with only_labelled(model, keep, all_states):
        if sp.segment_ids is not None:  # packed rows: a block-diagonal causal mask, one block per sample
            # mmhub's SDPA attention runs each sample's segment on its own and never reads the mask: building the
            # (L, L) mask of a long packed row would cost O(L^2) for nothing (it rebuilds it if it must fall back)
            impl = getattr(getattr(getattr(model.backbone, "model", None), "config", None), "_attn_implementation", "")
            mask = None if impl == HF_SDPA else block_causal_mask(sp.segment_ids)
            with packed_sequences(segment_lengths(sp.segment_ids)):
                hidden = model.backbone(sp.inputs_embeds, mask, sp.position_ids)
        else:
            prefix_lm = getattr(model.backbone, "prefix_lm", False)
            mask = prefix_lm_mask(sp.attention_mask, sp.labels) if prefix_lm else sp.attention_mask
            with injected(model, prep.injection):
                hidden = model.backbone(sp.inputs_embeds, mask, sp.position_ids)  # (B, L', H)
    return hidden, target, keep


def prefix_lm_mask(attention_mask: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) padding mask -> (B, 1, L, L) boolean mask (True = attend) of a prefix-LM (PaliGemma): causal, and
    bidirectional within each row's prefix: its real positions before the first labelled one (every real position
    when `labels` is None: a prompt being read for generation). Padding is never attended; a padding query attends
    itself only, so no row is empty."""
    real = attention_mask.bool()
    L = real.shape[1]
    prefix = real if labels is None else real & ((labels != IGNORE).long().cumsum(1) == 0)
    idx = torch.arange(L, device=real.device)
    causal = idx[None, :] <= idx[:, None]  # [query, key]
    allowed = (causal[None] | (prefix[:, :, None] & prefix[:, None, :])) & real[:, None, :]
    return (allowed | torch.eye(L, dtype=torch.bool, device=real.device)[None])[:, None]


def encoder_decoder(model: Any, sp: Spliced) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Encoder-decoder backbones: prompt side (incl. media tokens) -> encoder, labelled tokens -> decoder.

    Returns decoder hidden states (B, Lt, H), the targets (B, Lt) and where they are real.
    Without labels the whole sequence goes to the encoder and the decoder sees only its start token.
    """
    start_id = model.backbone.decoder_start_token_id
    if sp.labels is None:
        enc, enc_mask = sp.inputs_embeds, sp.attention_mask
        target = keep = None
        dec_in = torch.full((enc.shape[0], 1), start_id, device=enc.device)
        dec_mask = torch.ones_like(dec_in)
    else:
        real = sp.attention_mask.bool()
        enc, enc_mask = compact(sp.inputs_embeds, real & (sp.labels == IGNORE))
        target, keep = compact(sp.labels, real & (sp.labels != IGNORE), fill=IGNORE)
        start = torch.full_like(target[:, :1], start_id)
        dec_in = torch.cat([start, target[:, :-1].masked_fill(~keep[:, :-1], model.processor.pad_id)], 1)
        dec_mask = torch.cat([torch.ones_like(keep[:, :1]), keep[:, :-1]], 1).long()
    hidden = model.backbone(enc, enc_mask.long(), decoder_input_ids=dec_in, decoder_attention_mask=dec_mask)
    return hidden, target, keep
