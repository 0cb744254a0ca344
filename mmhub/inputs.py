"""Input preparation: token ids with placeholders + media (or cached encoder features) -> backbone-ready inputs.

`prepare` embeds the text, encodes and projects the media, splices the projected tokens in at their
placeholders (`mmhub.splice`) and, for models with injectors, builds the `InjectionContext` they read
during the backbone call (`injected`). Text-reading projectors get the text around each item
(`text_context`). Everything here works on an assembled `MMModel` and holds no state of its own.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

from mmhub.errors import InputError
from mmhub.interfaces import Encoder, InjectionContext, TextContext
from mmhub.splice import IGNORE, Spliced, compact, splice


@dataclass
class Prepared:
    """Backbone-ready inputs plus what injectors and the loss need."""

    spliced: Spliced
    injection: InjectionContext | None
    aux_loss: torch.Tensor | None


def prepare(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
            media: Mapping[str, torch.Tensor] | None, padding_side: str,
            features: Mapping[str, torch.Tensor] | None = None, segment_ids: torch.Tensor | None = None) -> Prepared:
    """`MMModel.prepare_inputs`, plus the injection context and the projectors' auxiliary loss."""
    if segment_ids is not None:
        check_packing(model)
        segment_ids = segment_ids.to(model.device)
    input_ids = input_ids.to(model.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(model.device)
    labels = labels.to(model.device) if labels is not None else None
    media = media or {}
    features = features or {}
    given = set(media) | set(features)
    ph_ids = model.processor.placeholder_ids
    for m in model.encoders:
        if m not in given and bool((input_ids == ph_ids[m]).any()):
            n = int((input_ids == ph_ids[m]).sum())
            raise InputError(f"the text has {n} {model.placeholder_names[ph_ids[m]]} placeholder(s) but 0 {m} items "
                             "were given")
    # placeholder ids may lie past the table
    safe_ids = input_ids.masked_fill(input_ids >= model.backbone_vocab_size, 0)
    text_embeds = model.backbone.embed(safe_ids)  # (B, L, H)
    if model.signal_tokens is not None:
        text_embeds = model.signal_tokens.embed_into(input_ids, text_embeds)
    text = {m: text_context(model, input_ids, attention_mask, labels, text_embeds, m, segment_ids)
            for m in given if m in model.projectors and model.projectors[m].uses_text}
    tokens, aux = model.encode_media(media, text, features)
    ragged = {m: pad_items(t) for m, t in tokens.items() if isinstance(t, list)}  # one tensor per item
    tokens.update({m: t for m, (t, _) in ragged.items()})
    context = model.plan.context_modalities
    spliced_media = {}
    for m, t in tokens.items():
        if m in context:  # the injector cross-attends to the tokens; the text keeps one marker token per item
            t = model.injectors[context[m]].marker(m).to(t.dtype).expand(t.shape[0], 1, -1)
        spliced_media[ph_ids[m]] = t
    masks = {**token_masks(model, media, features), **{m: k for m, (_, k) in ragged.items()}}
    spliced_masks = {ph_ids[m]: k for m, k in masks.items() if m not in context}  # items of their own length
    sp = splice(input_ids, text_embeds, attention_mask, labels, spliced_media, padding_side, model.placeholder_names,
                segment_ids, masks=spliced_masks)
    if model.backbone.grid_positions:  # M-RoPE: media tokens placed by their (t, h, w) grid
        sp.position_ids = grid_position_ids(model, input_ids, sp, media, segment_ids)
    injection = injection_context(model, input_ids, sp, tokens, masks) if len(model.injectors) else None
    return Prepared(sp, injection, aux)


def on_device(items: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """A modality's preprocessed items (stacked, or a list when their shapes differ) on `device`."""
    return [t.to(device) for t in items] if isinstance(items, list) else items.to(device)


def pad_items(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(T_i, H)] tokens of items of their own length -> (N, max T_i, H) zero-padded and (N, max T_i) real tokens."""
    longest = max(t.shape[0] for t in items)
    out = items[0].new_zeros(len(items), longest, items[0].shape[-1])
    mask = torch.zeros(len(items), longest, dtype=torch.bool, device=items[0].device)
    for i, t in enumerate(items):
        out[i, :t.shape[0]], mask[i, :t.shape[0]] = t, True
    return out, mask


def grid_position_ids(model: Any, input_ids: torch.Tensor, sp: Spliced, media: Mapping[str, Any],
                      segment_ids: torch.Tensor | None) -> torch.Tensor:
    """The backbone's position ids for a spliced sequence whose media tokens are placed by their (t, h, w) grid:
    each item's grid from its encoder (`Encoder.token_grid`) through its projector (`Projector.grid_out`); tokens
    without a grid (another tower, cached features) count as one row (1, 1, T)."""
    if segment_ids is not None:
        raise InputError(f"sequence packing (segment_ids) is not supported with the {model.backbone.name} backbone's "
                         "grid positions (M-RoPE positions do not restart per packed sample); collate unpacked")
    spans = []
    ph_ids = model.processor.placeholder_ids
    for m in model.encoders:
        if m in model.plan.context_modalities:
            continue
        rows, cols = (input_ids == ph_ids[m]).nonzero(as_tuple=True)  # row-major = item order
        items = media.get(m)
        for n, (b, t) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            where = ((sp.origin[b] == t) & sp.media_positions[b]).nonzero()[:, 0]
            grid = model.encoders[m].token_grid(items[n], m) if items is not None else None
            grid = model.projectors[m].grid_out(grid) if grid is not None else None
            grid = grid if grid is not None else (1, 1, len(where))
            if grid[0] * grid[1] * grid[2] != len(where):
                raise InputError(f"{m} item {n}: token grid {grid} holds {grid[0] * grid[1] * grid[2]} tokens but "
                                 f"{len(where)} were spliced in; the encoder's token_grid or the projector's grid_out "
                                 "is wrong")
            if len(where):
                spans.append((b, int(where[0]), grid))
    return model.backbone.media_position_ids(sp.attention_mask, spans)


def project_media(model: Any, media: Mapping[str, torch.Tensor], text: Mapping[str, TextContext] | None = None,
                  features: Mapping[str, torch.Tensor] | None = None
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """`MMModel.encode_media`: encoder (unless `features` holds its output) then projector, per modality."""
    out, aux = {}, []
    features = dict(features or {})
    feats_all = {**model.encode_features({m: t for m, t in media.items() if m not in features}),
                 **{m: f.to(model.device) for m, f in features.items()}}
    for m, feats in feats_all.items():
        if m not in model.projectors:
            raise InputError(f"got {m!r} features, but this model accepts {', '.join(model.encoders) or 'text only'}")
        proj = model.projectors[m]
        proj.aux_loss = None
        if isinstance(feats, list):  # items of their own size (dynamic resolution): the projector per item
            if proj.uses_text:
                raise InputError(f"the {proj.name} projector reads the text, which is not split per {m} item; "
                                 f"{m} items of different sizes need a projector that does not (patch_merger, mlp)")
            out[m] = [proj(f[None])[0] for f in feats]  # [(T_i', hidden)]
        else:
            out[m] = proj(feats, (text or {}).get(m))  # (N, T', hidden)
        enc = model.encoders[m] if m in model.encoders else None
        if enc is not None and type(enc).arrange is not Encoder.arrange:  # e.g. AnyRes: tiles -> rows, after projection
            if m not in media or m in features:
                raise InputError(f"{m} items came as cached encoder features, but the {enc.name} encoder arranges its "
                                 f"tokens from the preprocessed items, which features do not carry; pass the {m} "
                                 f"items themselves (cache_features: false for this stage)")
            if out[m].shape[1] != feats.shape[1]:
                raise InputError(f"the {enc.name} encoder arranges its {feats.shape[1]} tokens per {m} item after the "
                                 f"projector, but the {proj.name} projector turned them into {out[m].shape[1]}; use a "
                                 f"per-token projector (mlp, linear) with it")
            out[m] = enc.arrange(out[m], on_device(media[m], model.device), m, proj)
        if proj.aux_loss is not None:
            aux.append(proj.aux_loss)
    return out, (torch.stack(aux).sum() if aux else None)


def text_context(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
                 text_embeds: torch.Tensor, modality: str, segment_ids: torch.Tensor | None = None) -> TextContext:
    """Per item of `modality`: its sample's prompt-side text (and answer side when labelled)."""
    ph = torch.zeros_like(input_ids, dtype=torch.bool)
    for pid in model.processor.placeholder_ids.values():
        ph |= input_ids == pid
    valid = attention_mask.bool() & ~ph
    prompt = valid if labels is None else valid & (labels == IGNORE)
    if segment_ids is not None:  # packed rows: each item reads only its own sample's text
        rows, cols = (input_ids == model.processor.placeholder_ids[modality]).nonzero(as_tuple=True)
        own = segment_ids[rows] == segment_ids[rows, cols][:, None]  # (N, L)
        ctx = TextContext(*compact(text_embeds[rows], prompt[rows] & own))
        ctx.instruction_text = prompt_texts(model, input_ids[rows], prompt[rows] & own)
        if labels is not None:
            ctx.target, ctx.target_mask = compact(text_embeds[rows], valid[rows] & (labels[rows] != IGNORE) & own)
        return ctx
    inst, inst_mask = compact(text_embeds, prompt)
    rows = (input_ids == model.processor.placeholder_ids[modality]).nonzero(as_tuple=True)[0]
    ctx = TextContext(inst[rows], inst_mask[rows], instruction_text=prompt_texts(model, input_ids[rows], prompt[rows]))
    if labels is not None:
        tgt, tgt_mask = compact(text_embeds, valid & (labels != IGNORE))
        ctx.target, ctx.target_mask = tgt[rows], tgt_mask[rows]
    return ctx


def prompt_texts(model: Any, input_ids: torch.Tensor, keep: torch.Tensor) -> list[str]:
    """Each row's kept tokens decoded by the model's tokenizer (special tokens dropped): the prompt as text."""
    tok = model.processor.tokenizer
    return [tok.decode(ids[k].tolist(), skip_special_tokens=True) for ids, k in zip(input_ids, keep, strict=True)]


def check_packing(model: Any) -> None:
    """Raise `InputError` naming why this model cannot take packed rows (``segment_ids``), if it cannot."""
    why = None
    if model.is_encoder_decoder:
        why = "an encoder-decoder backbone (its encoder and decoder sides are split per row)"
    elif len(model.injectors):
        why = f"injectors ({', '.join(model.injectors)}: they index media per row, not per packed sample)"
    elif getattr(model.backbone, "prefix_lm", False):
        why = "a prefix-LM backbone (each sample's prompt attends bidirectionally, which the block mask does not do)"
    elif not model.backbone.supports_packing:
        why = f"the {model.backbone.name} backbone (it takes no 4D attention mask)"
    if why:
        raise InputError(f"sequence packing (segment_ids) is not supported with {why}; "
                         "collate these samples unpacked (MMProcessor.collate) instead")


def token_masks(model: Any, media: Mapping[str, torch.Tensor], features: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """Per modality whose encoder marks padding tokens (`Encoder.token_mask`): (N, T) its items' real tokens (an
    injector's context keys, or the tokens spliced per item). Such a modality cannot come as cached features: the
    mask is read off the preprocessed items."""
    out = {}
    for m in model.encoders:
        enc = model.encoders[m] if m in model.encoders else None
        if enc is None or type(enc).token_mask is Encoder.token_mask:
            continue
        if m in features:
            raise InputError(f"{m} items came as cached encoder features, but the {enc.name} encoder marks padding "
                             f"tokens from the preprocessed items (token_mask), which features do not carry; pass "
                             f"the {m} items themselves (cache_features: false for this stage)")
        if m in media:
            mask = enc.token_mask(on_device(media[m], model.device), m)
            if mask is not None:
                out[m] = mask
    return out


def injection_context(model: Any, input_ids: torch.Tensor, sp: Spliced, tokens: Mapping[str, torch.Tensor],
                      masks: Mapping[str, torch.Tensor] | None = None) -> InjectionContext:
    """What the injectors read during the backbone call: each sample's items, where they sit, which is latest."""
    B = input_ids.shape[0]
    H = sp.inputs_embeds.shape[-1]
    origin = sp.origin.clamp(min=0)
    ph_ids = model.processor.placeholder_ids
    context = model.plan.context_modalities
    is_marker = torch.zeros_like(input_ids, dtype=torch.bool)
    media, valid, index, token_mask = {}, {}, {}, {}
    for m in context:
        hit = input_ids == ph_ids[m]  # (B, L)
        is_marker |= hit
        nth = hit.long().cumsum(1) - 1  # latest item at or before each input position (-1 before the first)
        index[m] = nth.gather(1, origin).masked_fill(sp.origin < 0, -1)  # (B, L')
        M = max(int(hit.sum(1).max()), 1)
        t = tokens.get(m)
        T = t.shape[1] if t is not None else 1
        media[m] = sp.inputs_embeds.new_zeros(B, M, T, t.shape[-1] if t is not None else H)  # the injector's width
        valid[m] = torch.zeros(B, M, dtype=torch.bool, device=input_ids.device)
        if t is not None:
            b, _ = hit.nonzero(as_tuple=True)
            slot = nth[hit]
            media[m][b, slot] = t.to(media[m].dtype)
            valid[m][b, slot] = True
            if masks and m in masks:  # (N, T) real tokens of each item -> (B, M, T)
                token_mask[m] = torch.ones(B, M, T, dtype=torch.bool, device=input_ids.device)
                token_mask[m][b, slot] = masks[m].to(input_ids.device)
    positions = sp.media_positions & ~is_marker.gather(1, origin)
    token_ids = input_ids.gather(1, origin).masked_fill(sp.origin < 0, -1)
    return InjectionContext(media, valid, index, positions, token_mask, token_ids)


@contextmanager
def injected(model: Any, context: InjectionContext | None) -> Iterator[None]:
    """Hand `context` to every injector for the duration of one backbone call, then clear it."""
    for inj in model.injectors.values():
        inj.context = context
    try:
        yield
    finally:
        for inj in model.injectors.values():
            inj.context = None
