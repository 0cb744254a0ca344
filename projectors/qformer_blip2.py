"""The BLIP-2 / InstructBLIP Q-Former layout: post-LN BERT blocks, so Salesforce's weights load unchanged.

`BertQFormer` computes what transformers' ``Blip2QFormerModel`` (BLIP-2) and
``InstructBlipQFormerModel`` (InstructBLIP) compute, in mmhub's own modules:

* embeddings: the learned queries, followed (instruction-aware) by the instruction's Q-Former
  token ids through BERT word + absolute position embeddings (positions 0, 1, ... of the
  right-padded ids); one LayerNorm over the concatenation;
* each block (BERT's post-LN order): self-attention over [queries; instruction] -> add & LayerNorm;
  every ``cross_every``-th block (layers 0, k, 2k, ...) the query positions cross-attend to the
  encoder features -> add & LayerNorm; then an FFN -> add & LayerNorm, with separate FFNs for the
  query positions (BERT's ``intermediate_query``/``output_query``) and the instruction positions
  (``intermediate``/``output``);
* output: the query positions of the last block (no final norm).

`qformer_state` maps transformers' key names (``qformer.*`` plus ``query_tokens``) onto this
module's. The blocks attend through `mmhub.attention`, so the spec's backend applies.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmhub.attention import MultiheadAttention


class BertFFN(nn.Module):
    """BERT's feed-forward half of a block: linear -> GELU (erf) -> linear, then add & LayerNorm."""

    def __init__(self, width: int, hidden: int, eps: float):
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + self.down(self.act(self.up(h))))


class BertQFormerBlock(nn.Module):
    """One post-LN Q-Former layer: self-attention over [queries; text], the queries' cross-attention to the features
    (only when built with ``cross_dim``), then the query FFN (and the text FFN for the text positions)."""

    def __init__(self, width: int, heads: int, hidden: int, eps: float, backend: str, cross_dim: int | None = None,
                 text_ffn: bool = False):
        super().__init__()
        self.self_attn = MultiheadAttention(width, heads, backend=backend)
        self.self_norm = nn.LayerNorm(width, eps=eps)
        self.cross_attn = MultiheadAttention(width, heads, kv_dim=cross_dim, backend=backend) if cross_dim else None
        self.cross_norm = nn.LayerNorm(width, eps=eps) if cross_dim else None
        self.ffn = BertFFN(width, hidden, eps)
        self.text_ffn = BertFFN(width, hidden, eps) if text_ffn else None

    @property
    def has_cross_attention(self) -> bool:
        return self.cross_attn is not None

    def forward(self, h: torch.Tensor, n_queries: int, mask: torch.Tensor | None, features: torch.Tensor,
                last: bool = False) -> torch.Tensor:
        """h: (N, Q + L, width), queries first; mask: (N, Q + L) True = real token, or (N, Q + L, Q + L) True = row may
        attend to column; features: (N, T, cross_dim) (unused when ``n_queries`` is 0: BERT's text-only pass).
        With `last` only the query positions are returned (the text positions of the last block are never read)."""
        h = self.self_norm(h + self.self_attn(h, mask=mask))
        queries, text = h[:, :n_queries], h[:, n_queries:]
        if self.cross_attn is not None and self.cross_norm is not None and n_queries:  # text alone: no image
            queries = self.cross_norm(queries + self.cross_attn(queries, features))
        queries = self.ffn(queries)
        if last or text.shape[1] == 0:
            return queries
        if self.text_ffn is None:
            raise ValueError("this Q-Former block has no text FFN, so it cannot take instruction tokens; "
                             "build it with text_ffn=True (instruction_aware: true)")
        return torch.cat([queries, self.text_ffn(text)], 1)


class BertQFormer(nn.Module):
    """Learned queries (+ optional instruction ids) through post-LN `BertQFormerBlock`s -> (N, num_queries, width)."""

    def __init__(self, num_queries: int, width: int, layers: int, heads: int, hidden: int, eps: float, backend: str,
                 feature_dim: int, cross_every: int, text_vocab: int | None = None, text_positions: int = 512,
                 text_pad_id: int = 0):
        super().__init__()
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.empty(num_queries, width))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.word_embeddings = nn.Embedding(text_vocab, width, padding_idx=text_pad_id) if text_vocab else None
        self.position_embeddings = nn.Embedding(text_positions, width) if text_vocab else None
        for table in (self.word_embeddings, self.position_embeddings):  # BERT's init (initializer_range 0.02)
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)
                if table.padding_idx is not None:
                    nn.init.zeros_(table.weight[table.padding_idx])
        self.embed_norm = nn.LayerNorm(width, eps=eps)
        self.blocks = nn.ModuleList(
            BertQFormerBlock(width, heads, hidden, eps, backend,
                             cross_dim=feature_dim if i % cross_every == 0 else None, text_ffn=text_vocab is not None)
            for i in range(layers))

    @property
    def text_positions(self) -> int:
        return self.position_embeddings.num_embeddings if self.position_embeddings is not None else 0

    def forward(self, features: torch.Tensor, text_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """features (N, T, feature_dim); text_ids/text_mask (N, L) right-padded Q-Former token ids -> (N, Q, width)."""
        return self._run(features, text_ids, text_mask, None, True, last=True)

    def states(self, features: torch.Tensor | None, text_ids: torch.Tensor | None = None,
               text_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block's (query states (N, Q, width), text states (N, L, width)), as the first-stage losses read
        them. With `features` None only the text goes through (no queries, no cross-attention: BLIP-2's text
        encoder, Q = 0). `attn_mask` (N, Q + L, Q + L), True = may attend, replaces the padding mask (ITG's
        multimodal causal mask); without it every position attends to every real one (ITM's bidirectional mask)."""
        if features is None and text_ids is None:
            raise ValueError("BertQFormer.states needs features, text ids or both")
        h = self._run(features, text_ids, text_mask, attn_mask, features is not None, last=False)
        Q = self.num_queries if features is not None else 0
        return h[:, :Q], h[:, Q:]

    def _run(self, features: torch.Tensor | None, text_ids: torch.Tensor | None, text_mask: torch.Tensor | None,
             attn_mask: torch.Tensor | None, with_queries: bool, last: bool) -> torch.Tensor:
        ref = features if features is not None else text_ids
        assert ref is not None
        N, Q = ref.shape[0], self.num_queries if with_queries else 0
        dtype = features.dtype if features is not None else self.queries.dtype
        h = self.queries.to(dtype).expand(N, -1, -1)[:, :Q]
        mask = None
        if text_ids is not None:
            if self.word_embeddings is None or self.position_embeddings is None:
                raise ValueError("this Q-Former has no text embeddings (instruction_aware: false) but got "
                                 "instruction ids; build it instruction-aware or pass no text")
            L = text_ids.shape[1]
            if L > self.text_positions:
                raise ValueError(f"the instruction has {L} Q-Former tokens but the position table holds "
                                 f"{self.text_positions}; truncate the instruction to {self.text_positions} tokens")
            positions = torch.arange(L, device=text_ids.device)
            text = self.word_embeddings(text_ids) + self.position_embeddings(positions)[None]
            h = torch.cat([h, text.to(h.dtype)], 1)
            if text_mask is None:
                text_mask = torch.ones_like(text_ids, dtype=torch.bool)
            mask = torch.cat([torch.ones(N, Q, dtype=torch.bool, device=h.device), text_mask.to(torch.bool)], 1)
        if attn_mask is not None:
            if attn_mask.shape != (N, h.shape[1], h.shape[1]):
                raise ValueError(f"attn_mask {tuple(attn_mask.shape)} does not match {N} rows of {Q} queries + "
                                 f"{h.shape[1] - Q} text tokens; give (N, Q + L, Q + L)")
            mask = attn_mask.to(torch.bool)
        h = self.embed_norm(h)
        for i, block in enumerate(self.blocks):
            h = block(h, Q, mask, features, last=last and i == len(self.blocks) - 1)
        return h[:, :Q] if last else h


# transformers' names inside one Q-Former layer -> BertQFormerBlock's
_ATTN = {"query": "q", "key": "k", "value": "v"}
_FFN = {"intermediate_query.dense": "ffn.up", "output_query.dense": "ffn.down", "output_query.LayerNorm": "ffn.norm",
        "intermediate.dense": "text_ffn.up", "output.dense": "text_ffn.down", "output.LayerNorm": "text_ffn.norm"}
_EMBED = {"layernorm": "embed_norm", "embeddings.layernorm": "embed_norm",
          "embeddings.word_embeddings": "word_embeddings", "embeddings.position_embeddings": "position_embeddings"}


def _layer_key(rest: str) -> str | None:
    """``attention.attention.query.weight`` (one layer's transformers name) -> mmhub's, or None when unknown."""
    name, _, leaf = rest.rpartition(".")
    for hf, ours in (("attention", "self"), ("crossattention", "cross")):
        if name.startswith(f"{hf}.attention."):
            proj = _ATTN.get(name[len(hf) + len(".attention."):])
            return f"{ours}_attn.{proj}.{leaf}" if proj else None
        if name == f"{hf}.output.dense":
            return f"{ours}_attn.out.{leaf}"
        if name == f"{hf}.output.LayerNorm":
            return f"{ours}_norm.{leaf}"
    return f"{_FFN[name]}.{leaf}" if name in _FFN else None


def qformer_state(qformer: dict[str, torch.Tensor], query_tokens: torch.Tensor,
                  text_ffn: bool) -> dict[str, torch.Tensor]:
    """transformers' Q-Former tensors (``qformer.`` prefix removed) + ``query_tokens`` (1, Q, width) -> the state dict
    of `BertQFormer`. BLIP-2 checkpoints may carry an unused text FFN (``use_qformer_text_input``): it is kept only
    when `text_ffn`. A tensor with no place here is an error naming it."""
    state: dict[str, torch.Tensor] = {"queries": query_tokens.reshape(query_tokens.shape[-2:])}
    unknown = []
    for key, value in qformer.items():
        if key.endswith("position_ids"):
            continue  # a non-persistent buffer some older checkpoints saved
        stem, _, leaf = key.rpartition(".")
        if stem in _EMBED:
            state[f"{_EMBED[stem]}.{leaf}"] = value
            continue
        parts = key.split(".")
        if parts[:2] == ["encoder", "layer"] and len(parts) > 3:
            ours = _layer_key(".".join(parts[3:]))
            if ours is not None:
                if ours.startswith("text_ffn.") and not text_ffn:
                    continue
                state[f"blocks.{parts[2]}.{ours}"] = value
                continue
        unknown.append(key)
    if unknown:
        raise ValueError(f"Q-Former tensors with no place in mmhub's blip2 layout: {', '.join(unknown[:8])}"
                         f"{' ...' if len(unknown) > 8 else ''}; the checkpoint is not a BLIP-2/InstructBLIP Q-Former")
    return state


def tokenize_instructions(tokenizer: Any, texts: list[str], max_len: int,
                          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Instruction texts -> right-padded Q-Former ids and mask (N, L), as InstructBLIP's processor tokenizes them
    (the Q-Former tokenizer's own special tokens; truncated to the position table's `max_len`)."""
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_len, padding_side="right",
                    return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device).bool()


def hf_qformer_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The inverse of `qformer_state`: a `BertQFormer` state dict -> (transformers' Q-Former tensors, without the
    ``qformer.`` prefix; ``query_tokens`` (1, Q, width)). The embedding norm is BLIP-2's ``layernorm``, or
    InstructBLIP's ``embeddings.layernorm`` when the state holds text embeddings."""
    instruct = "word_embeddings.weight" in state
    embed = {v: k for k, v in _EMBED.items() if k.startswith("embeddings.") == instruct or k.endswith("_embeddings")}
    attn = {v: k for k, v in _ATTN.items()}
    ffn = {v: k for k, v in _FFN.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "queries":
            continue
        stem, _, leaf = key.rpartition(".")
        if stem in embed:
            out[f"{embed[stem]}.{leaf}"] = value
            continue
        _, index, rest = key.split(".", 2)  # blocks.{i}.{rest}
        name, _, leaf = rest.rpartition(".")
        hf = None
        for ours, theirs in (("self", "attention"), ("cross", "crossattention")):
            if name.startswith(f"{ours}_attn."):
                proj = name[len(ours) + len("_attn."):]
                hf = f"{theirs}.output.dense" if proj == "out" else f"{theirs}.attention.{attn[proj]}"
            elif name == f"{ours}_norm":
                hf = f"{theirs}.output.LayerNorm"
        hf = hf or ffn[name]
        out[f"encoder.layer.{index}.{hf}.{leaf}"] = value
    return out, state["queries"][None]
