"""The training losses of `MMModel.forward`: label cross-entropy, sequence log-probabilities, output alignment.

* `label_losses`: next-token cross-entropy over the labelled positions only (mean), plus each row's summed
  log-probability of its labelled tokens (what DPO compares); ``runtime.loss_chunk`` runs the head and the
  loss chunk by chunk (`label_cross_entropy`);
* `output_loss`: decoding-side alignment as NExT-GPT trains it: the output projector's reading of each signal
  group's hidden states against the generator's own text features of its caption (MSE);
* `only_labelled`: the backbone's `only_at` context over the positions the loss reads
  (``runtime.labelled_only_mlp``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mmhub.errors import InputError
from mmhub.runtime import loss_chunk_for
from mmhub.splice import Spliced


def label_cross_entropy(model: Any, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy of the head's logits at `hidden` (N, H) against `target` (N,) columns.

    With ``runtime.loss_chunk`` set (or ``auto`` with large logits: `mmhub.runtime.loss_chunk_for`) and gradients
    on, the head and the loss run over chunks of that many positions under activation checkpointing: no chunk's
    logits outlive its own forward or backward, so peak memory holds one chunk's (chunk x vocabulary) logits instead
    of all N; the head's matmul runs once more in the backward pass. The loss and gradients equal the unchunked ones
    (up to float summation order)."""
    chunk = loss_chunk_for(model.spec.runtime.loss_chunk, hidden.shape[0], model.backbone_vocab_size)

    def ce(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model.head(h).float(), t, reduction="none")

    if not chunk or hidden.shape[0] <= chunk or not torch.is_grad_enabled():
        return ce(hidden, target)
    return torch.cat([checkpoint(ce, hidden[i:i + chunk], target[i:i + chunk], use_reentrant=False)
                      for i in range(0, hidden.shape[0], chunk)])


def label_losses(model: Any, hidden: torch.Tensor, target: torch.Tensor, keep: torch.Tensor
                 ) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(mean cross-entropy over labelled positions, their count, (B,) summed log-probability per row).

    `hidden` (B, L, H) and `target`/`keep` (B, L-1) for decoder-only models (position t predicts t+1);
    for encoder-decoder ones all three have the decoder's length."""
    n_target = int(keep.sum())
    seq_logp = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
    if n_target == 0:
        return hidden.sum() * 0.0, 0, seq_logp  # keeps the graph; a batch with no targets contributes nothing
    h = hidden[keep] if model.is_encoder_decoder else hidden[:, :-1][keep]
    tgt = target[keep] if model.signal_tokens is None else model.signal_tokens.columns(target[keep])
    ce = label_cross_entropy(model, h, tgt)  # labelled positions only
    return ce.mean(), n_target, seq_logp.index_add(0, keep.nonzero(as_tuple=True)[0], -ce)


def only_labelled(model: Any, keep: torch.Tensor | None, all_states: bool) -> Any:
    """The backbone's `only_at` context for the positions whose final state the loss reads (`keep` (B, L-1):
    those followed by a label), when nothing else reads the states (no logits returned, no output-side loss)
    and ``runtime.labelled_only_mlp`` is on; else no-op."""
    if keep is None or all_states or not model.spec.runtime.labelled_only_mlp:
        return nullcontext()
    return model.backbone.only_at(F.pad(keep, (0, 1), value=False))  # the last position predicts nothing


def signal_states(model: Any, token_ids: torch.Tensor, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """Hidden states at signal-token positions, grouped per item: {modality: (N, k, H)} in row-major order.

    `token_ids` (B, L') holds the token id at each position of `hidden` (B, L', H) (-1 where none)."""
    if model.signal_tokens is None:
        return {}
    out = {}
    for m in model.signal_tokens.modalities:
        ids = torch.tensor(model.signal_tokens.ids_of(m), device=token_ids.device)
        hit = (token_ids[..., None] == ids).any(-1)
        n, k = int(hit.sum()), len(ids)
        if n == 0:
            continue
        if n % k:
            raise InputError(f"the text holds {n} {m} signal tokens, not a whole number of groups of {k}; "
                             f"write one {model.processor.signal_groups[m][0]} marker per {m} to generate")
        out[m] = hidden[hit].reshape(n // k, k, -1)
    return out


class CaptionFeatures:
    """The generators' own text features of captions (N, cond_len, cond_dim), computed once per caption."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def __call__(self, generators: Mapping[str, Any], modality: str, captions: Sequence[str],
                 device: torch.device) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if (modality, c) not in self._cache]
        if missing:
            with torch.no_grad():
                feats = generators[modality].encode_text(list(missing))
            for c, f in zip(missing, feats, strict=True):
                self._cache[(modality, c)] = f.detach()
        return torch.stack([self._cache[(modality, c)] for c in captions]).to(device)


def output_loss(model: Any, input_ids: torch.Tensor, sp: Spliced, hidden: torch.Tensor,
                outputs: Mapping[str, Sequence[str]]) -> torch.Tensor:
    """Sum over output modalities of the MSE between projected signal-group states and their captions' features."""
    token_ids = input_ids.gather(1, sp.origin.clamp(min=0)).masked_fill(sp.origin < 0, -1)
    token_ids = token_ids.masked_fill(sp.media_positions, -1)
    states = signal_states(model, token_ids, hidden)
    total = hidden.new_zeros(())
    for m, captions in outputs.items():
        if not captions:
            continue
        if m not in model.output_projectors:
            raise InputError(f"the batch has {m} output captions, but this model generates "
                             f"{', '.join(model.output_projectors) or 'nothing'}")
        got = states.get(m)
        n = 0 if got is None else got.shape[0]
        if n != len(captions):
            raise InputError(f"{len(captions)} {m} output caption(s) but {n} signal group(s) in the text; write one "
                             f"{model.processor.signal_groups[m][0]} marker per caption")
        pred = model.output_projectors[m](got)
        total = total + F.mse_loss(pred.float(), model.caption_features(m, captions).float())
    return total
