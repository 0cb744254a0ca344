"""Signal tokens: the vocabulary an any-to-any model emits to ask a generator for media.

A spec's ``signal_tokens: {image: 4}`` gives the backbone k new tokens per output modality,
``<img_0>`` ... ``<img_3>`` (``vid`` for video, ``aud`` for audio). They are added to the
tokenizer as special tokens (so decoded text drops them) and get their own input-embedding
and LM-head rows here, *beside* the backbone's tables: the backbone stays untouched (frozen,
LoRA or quantized alike), only these 2 x k rows train when it is frozen, and a saved model
stores just them. Logits over the extended vocabulary are the backbone's columns followed by
one column per signal token; the backbone's own columns at the signal tokens' ids (tokenizers
smaller than the model's vocabulary give them ids inside the table) are masked out.

Training data writes one group marker per media item to generate in an assistant turn —
``<img_out>`` (``<vid_out>``, ``<aud_out>``) — which the processor expands into the group's k
tokens. When the model emits a group's first token at inference, the rest of the group is
forced, and the hidden states at the group's k positions go to the output projector.
"""

from __future__ import annotations

import torch
from torch import nn

PREFIX = {"image": "img", "video": "vid", "audio": "aud"}
DEFAULT_COUNT = 4


def prefix(modality: str) -> str:
    """The short name used in a modality's signal tokens (``img`` for image)."""
    return PREFIX.get(modality, modality[:3])


def token_names(modality: str, k: int) -> list[str]:
    """``<img_0>`` ... ``<img_{k-1}>`` for `modality`."""
    return [f"<{prefix(modality)}_{i}>" for i in range(k)]


def group_marker(modality: str) -> str:
    """The marker data writes where the model should emit one item of `modality` (``<img_out>``)."""
    return f"<{prefix(modality)}_out>"


class SignalTokens(nn.Module):
    """The signal tokens' own embedding and LM-head rows, and the id <-> logit-column bookkeeping."""

    def __init__(self, counts: dict[str, int], tokenizer: object, hidden_size: int, base_vocab: int,
                 init_std: float = 0.02):
        super().__init__()
        self.counts = dict(counts)
        self.modalities = list(counts)
        names = [n for m in self.modalities for n in token_names(m, counts[m])]
        tokenizer.add_tokens([n for n in names if n not in tokenizer.get_vocab()], special_tokens=True)  # type: ignore[attr-defined]
        ids = [tokenizer.convert_tokens_to_ids(n) for n in names]  # type: ignore[attr-defined]
        self.base_vocab = base_vocab
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        n = len(ids)
        self.embed = nn.Parameter(torch.randn(n, hidden_size) * init_std)
        self.head = nn.Parameter(torch.randn(n, hidden_size) * init_std)
        starts, at = {}, 0
        for m in self.modalities:
            starts[m] = at
            at += counts[m]
        self.starts = starts

    @torch.no_grad()
    def init_from_tables(self, input_embeddings: torch.Tensor, output_embeddings: torch.Tensor,
                         noise: float = 0.02) -> None:
        """Start every row at the mean of the backbone's rows (plus a little noise), as new-token practice goes:
        near-zero head rows give logits far below a trained model's (measured: ~0 against ~34 on SmolLM2), so
        a frozen backbone's signal tokens never win within a short stage."""
        for param, table in ((self.embed, input_embeddings), (self.head, output_embeddings)):
            mean, std = table.float().mean(0), table.float().std(0).mean()
            param.copy_(mean + noise * std * torch.randn_like(param))

    def has_weight_source(self) -> bool:
        """Signal rows are always trained here, so they are always saved."""
        return False

    def __len__(self) -> int:
        return int(self.ids.numel())

    def ids_of(self, modality: str) -> list[int]:
        """Tokenizer ids of `modality`'s k signal tokens, in order."""
        s = self.starts[modality]
        return self.ids[s:s + self.counts[modality]].tolist()

    def row(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per position, the signal row index (0..n-1) of the token, or -1 for any other token."""
        hit = input_ids[..., None] == self.ids  # (..., n)
        return torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(input_ids, -1))

    def embed_into(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Replace the embeddings at signal-token positions with the signal rows."""
        rows = self.row(input_ids)
        where = rows >= 0
        if not bool(where.any()):
            return embeds
        out = embeds.clone()
        out[where] = self.embed[rows[where]].to(embeds.dtype)
        return out

    def logits(self, hidden: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Backbone logits (..., V) + hidden (..., H) -> extended logits (..., V + n)."""
        inside = self.ids[self.ids < base.shape[-1]]
        if inside.numel():
            base = base.index_fill(-1, inside, torch.finfo(base.dtype).min)
        return torch.cat([base, hidden @ self.head.to(hidden.dtype).T], -1)

    def columns(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids -> extended-logit columns (signal ids move to V + row; other ids stay)."""
        rows = self.row(token_ids)
        return torch.where(rows >= 0, self.base_vocab + rows, token_ids)

    def token_ids(self, columns: torch.Tensor) -> torch.Tensor:
        """Extended-logit columns -> tokenizer ids (the inverse of `columns`)."""
        sig = columns >= self.base_vocab
        return torch.where(sig, self.ids[(columns - self.base_vocab).clamp(0, len(self) - 1)], columns)

    def modality_of_row(self, row: int) -> tuple[str, int]:
        """Row index -> (modality, position within its group)."""
        for m in self.modalities:
            if self.starts[m] <= row < self.starts[m] + self.counts[m]:
                return m, row - self.starts[m]
        raise IndexError(f"signal row {row} out of range 0..{len(self) - 1}")
