"""mmhub's own decode loop: KV-cached, step by step, over the vocabulary extended with signal tokens.

transformers' ``generate`` cannot emit tokens past the backbone's LM head nor hand back the
hidden states of particular tokens, and an any-to-any model needs both: it emits signal
tokens (``<img_0>`` ...; `mmhub.signals`) whose last-layer states become a generator's
conditioning. This loop samples from `MMModel.head` (backbone columns + one per signal
token), forces the rest of a group once its first token is emitted (a group begun before
the token limit is completed past it), and records the state at each signal position —
the state the model computes when that token is its input, exactly as in training.

Models without signal tokens use the same loop whenever their backbone declares ``supports_step``
and the settings are the loop's own (`OWN_LOOP_SETTINGS`); `mmhub.generation` picks the path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mmhub.passes import prefix_lm_mask
from mmhub.reply import FinishReason

# the generation settings `decode` takes (anything else goes to transformers' generate)
OWN_LOOP_SETTINGS = frozenset({"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "streamer"})


@dataclass
class Decoded:
    """Per row: generated tokenizer ids (stop token excluded), the states of completed signal groups and
    whether the row ended on a stop token ("stop") or at the token limit ("length")."""

    tokens: list[list[int]]
    signals: list[dict[str, list[torch.Tensor]]] = field(default_factory=list)  # modality -> [(k, H) per item]
    finish_reasons: list[FinishReason] = field(default_factory=list)


def pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
         generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) chosen columns: greedy, or temperature + nucleus (top-p) sampling."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p (always the first)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode(model: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
           max_new_tokens: int, stop_ids: list[int], suppress_ids: list[int] | None = None, do_sample: bool = False,
           temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, streamer: Any = None,
           min_new_tokens: int = 0) -> Decoded:
    """Generate from left-padded prompt embeddings (B, L, H) with `model`'s backbone `step` and `head`.

    `streamer` (transformers' streamer protocol: ``put`` the prompt first, then each step's new ids
    (B,), then ``end``) sees every token as it is chosen, stop tokens included. Stop tokens cannot be chosen
    before `min_new_tokens` tokens."""
    if streamer is not None:
        streamer.put(torch.zeros(inputs_embeds.shape[0], 0, dtype=torch.long))  # the protocol's prompt call
    try:
        return _decode(model, inputs_embeds, attention_mask, position_ids, max_new_tokens, stop_ids, suppress_ids,
                       do_sample, temperature, top_p, seed, streamer, min_new_tokens)
    finally:
        if streamer is not None:
            streamer.end()


def _decode(model: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
            max_new_tokens: int, stop_ids: list[int], suppress_ids: list[int] | None, do_sample: bool,
            temperature: float, top_p: float, seed: int | None, streamer: Any, min_new_tokens: int = 0) -> Decoded:
    backbone, sig = model.backbone, model.signal_tokens
    B = inputs_embeds.shape[0]
    device = inputs_embeds.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    pad = model.processor.pad_id
    first = group_starts(sig)
    suppress, stops = head_columns(sig, suppress_ids, stop_ids, device)

    mask = attention_mask.clone()
    # a prefix-LM reads the whole prompt bidirectionally; every generated token then attends causally
    first_mask = prefix_lm_mask(mask) if getattr(backbone, "prefix_lm", False) else mask
    hidden, cache = backbone.step(inputs_embeds, first_mask, position_ids, None)
    last = hidden[:, -1]
    next_pos = position_ids[..., -1:] + 1  # (B, 1); (3, B, 1) for M-RoPE positions
    out = Decoded([[] for _ in range(B)], [{} for _ in range(B)], ["length"] * B)
    done = [False] * B
    forced: list[list[int]] = [[] for _ in range(B)]
    pending: list[tuple[str, list[torch.Tensor], int] | None] = [None] * B  # (modality, states so far, k)
    steps = 0
    while True:
        logits = model.head(last).float()
        if suppress.numel():
            logits[:, suppress] = torch.finfo(logits.dtype).min
        if steps < min_new_tokens and stops.numel():
            logits[:, stops[stops < logits.shape[-1]]] = torch.finfo(logits.dtype).min
        cols = pick(logits, do_sample, temperature, top_p, generator)
        ids = (sig.token_ids(cols) if sig is not None else cols).tolist()
        take(ids, out, done, forced, pending, first, stop_ids, pad, within_limit=steps < max_new_tokens)
        steps += 1  # tokens chosen so far
        if streamer is not None:
            streamer.put(torch.tensor([i if not d or i != pad else stop_ids[0] if stop_ids else pad
                                       for i, d in zip(ids, done, strict=True)]))
        if all(done):
            break
        if steps >= max_new_tokens and not any(forced) and not any(p is not None for p in pending):
            break  # the last token's own state is not needed: no step for it (a token of a group still needs one)
        emb = embed_ids(model, torch.tensor(ids, device=device)[:, None])
        alive = torch.tensor([0 if d and not p else 1 for d, p in zip(done, pending, strict=True)], device=device)
        mask = torch.cat([mask, alive[:, None].to(mask.dtype)], 1)
        hidden, cache = backbone.step(emb, mask, next_pos, cache)
        last = hidden[:, -1]
        next_pos = next_pos + 1
        record_group_states(out, pending, last)
        if steps >= max_new_tokens and not any(forced) and not any(p is not None for p in pending):
            break
    return out


def group_starts(sig: Any) -> dict[int, tuple[str, list[int]]]:
    """First token id of each signal group -> (modality, the group's ids)."""
    first = {}
    if sig is not None:
        for m in sig.modalities:
            ids = sig.ids_of(m)
            first[ids[0]] = (m, ids)
    return first


def head_columns(sig: Any, suppress_ids: list[int] | None, stop_ids: list[int],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's columns of the suppressed ids and of the stop ids."""
    suppress = torch.tensor(sorted(set(suppress_ids or [])), dtype=torch.long, device=device)
    if sig is not None and suppress.numel():
        # ids past the backbone's table that are not signal tokens (a placeholder added after the vocabulary, say)
        # have no column of their own: mapped as they are they would land on a signal column and mask it out
        keep = (suppress < sig.base_vocab) | (sig.row(suppress) >= 0)
        suppress = sig.columns(suppress[keep])
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    if sig is not None and stops.numel():
        stops = sig.columns(stops)
    return suppress, stops


def take(ids: list[int], out: Decoded, done: list[bool], forced: list[list[int]], pending: list[Any],
          first: dict[int, tuple[str, list[int]]], stop_ids: list[int], pad: int, within_limit: bool) -> None:
    """Per row, in place: the chosen id becomes the row's next token (pad once the row is done), a forced group
    token overrides it, a stop id ends the row; a group's first token forces the rest of the group."""
    for b in range(len(ids)):
        if done[b]:
            ids[b] = pad
        elif forced[b]:
            ids[b] = forced[b].pop(0)
            out.tokens[b].append(ids[b])
        elif ids[b] in stop_ids:
            done[b] = True
            out.finish_reasons[b] = "stop" if within_limit else "length"  # past the limit only batch-mates ran on
            ids[b] = pad
        else:
            out.tokens[b].append(ids[b])
            if ids[b] in first:  # a group begins: its other tokens follow whatever the model would pick
                m, group = first[ids[b]]
                forced[b] = list(group[1:])
                pending[b] = (m, [], len(group))


def embed_ids(model: Any, step_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1) chosen ids -> their input embeddings (signal tokens from their own rows)."""
    emb = model.backbone.embed(step_ids.masked_fill(step_ids >= model.backbone_vocab_size, 0))
    if model.signal_tokens is not None:
        emb = model.signal_tokens.embed_into(step_ids, emb)
    return emb


def record_group_states(out: Decoded, pending: list[Any], last: torch.Tensor) -> None:
    """The token just fed belongs to a group: its state (`last` (B, H)) is the group's; a full group is recorded."""
    for b in range(len(pending)):
        if pending[b] is not None:
            m, states, k = pending[b]
            states.append(last[b])
            if len(states) == k:
                out.signals[b].setdefault(m, []).append(torch.stack(states))
                pending[b] = None
