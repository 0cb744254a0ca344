"""Generation: prompts -> `Reply`s, through one decode path.

`decode_batch` is the path every caller takes (`MMModel.generate`, `MMModel.generate_ids`, streaming):
mmhub's own KV-cached loop (`mmhub.decoding`) for models with signal tokens and for decoder-only models
whose backbone declares ``supports_step`` when the settings are the loop's own; otherwise the named
fallback, `transformers_generate`, runs the backbone's ``generate`` (encoder-decoder backbones, injectors,
beams, repetition penalty, ...). Both give the same greedy tokens. `draw` turns signal-group states into
media through each output projector and generator.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from mmhub.decoding import OWN_LOOP_SETTINGS, Decoded, decode
from mmhub.errors import InputError
from mmhub.inputs import injected, prepare
from mmhub.reply import Reply


def uses_own_loop(model: Any, settings: Mapping[str, Any]) -> bool:
    """Whether `decode_batch` runs mmhub's decode loop for these settings (else `transformers_generate`)."""
    if model.signal_tokens is not None:
        return True
    # injectors whose hooks compute the same under mmhub's loop (``own_loop_safe``: CogVLM's visual experts) keep it
    injectors_ok = all(getattr(inj, "own_loop_safe", False) for inj in model.injectors.values())
    return (not model.is_encoder_decoder and injectors_ok and model.backbone.supports_step
            and set(settings) <= OWN_LOOP_SETTINGS)


def stop_token_ids(model: Any) -> list[int]:
    """The tokenizer ids of the chat template's stop strings (those that are single known tokens)."""
    tok = model.tokenizer
    ids = []
    for s in model.plan.template.stop_strings(tok):
        tid = tok.convert_tokens_to_ids(s)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


@torch.no_grad()
def decode_batch(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 media: Mapping[str, torch.Tensor] | None = None, seed: int | None = None, **settings: Any) -> Decoded:
    """Left-padded ids + media -> per row the generated ids (stop tokens removed), signal states, finish reason."""
    was_training = model.training
    model.eval()
    try:
        if uses_own_loop(model, settings):
            return own_loop(model, input_ids, attention_mask, media, seed=seed, **settings)
        return transformers_generate(model, input_ids, attention_mask, media, seed=seed, **settings)
    finally:
        model.train(was_training)


def own_loop(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             media: Mapping[str, torch.Tensor] | None, seed: int | None = None, **settings: Any) -> Decoded:
    """mmhub's decode loop (`mmhub.decoding.decode`) over the prepared prompt."""
    prep = prepare(model, input_ids, attention_mask, None, media, padding_side="left")
    sp = prep.spliced
    suppress = [i for i in model.processor.placeholder_ids.values()
                if model.signal_tokens is not None or i < model.backbone_vocab_size]
    with injected(model, prep.injection):
        return decode(model, sp.inputs_embeds, sp.attention_mask, sp.position_ids, stop_ids=stop_token_ids(model),
                      suppress_ids=suppress, seed=seed, **settings)


def transformers_generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          media: Mapping[str, torch.Tensor] | None, seed: int | None = None,
                          **settings: Any) -> Decoded:
    """The fallback: the backbone's own ``generate`` (transformers') over the prepared prompt, injectors active."""
    if getattr(model.backbone, "prefix_lm", False):
        raise InputError(f"generation settings {', '.join(sorted(set(settings) - OWN_LOOP_SETTINGS)) or '-'} need "
                         f"transformers' generate, which cannot give the {model.backbone.name} backbone its prefix-LM "
                         f"mask (the prompt read bidirectionally); use only {', '.join(sorted(OWN_LOOP_SETTINGS))}")
    if model.backbone.grid_positions and media:
        raise InputError(f"generation settings {', '.join(sorted(set(settings) - OWN_LOOP_SETTINGS)) or '-'} need "
                         f"transformers' generate, which cannot give the {model.backbone.name} backbone the grid "
                         f"(M-RoPE) positions of the media tokens; use only {', '.join(sorted(OWN_LOOP_SETTINGS))}")
    prep = prepare(model, input_ids, attention_mask, None, media, padding_side="left")
    sp = prep.spliced
    stop_ids = stop_token_ids(model)
    if seed is not None:
        torch.manual_seed(seed)
    # the model must never "write" a media placeholder; ids past the LM head cannot be sampled anyway
    suppress = [i for i in model.processor.placeholder_ids.values() if i < model.backbone_vocab_size]
    with injected(model, prep.injection):
        out = model.backbone.generate(sp.inputs_embeds, sp.attention_mask, eos_token_id=stop_ids,
                                      pad_token_id=model.processor.pad_id, suppress_tokens=suppress or None, **settings)
    decoded = Decoded([], [])
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), None)
        decoded.tokens.append(row[:cut] if cut is not None else row)
        decoded.signals.append({})
        decoded.finish_reasons.append("stop" if cut is not None else "length")
    return decoded


@torch.no_grad()
def draw(model: Any, states: Mapping[str, Sequence[torch.Tensor]], seed: int | None = None, steps: int | None = None,
         guidance_scale: float | None = None) -> dict[str, list[Any]]:
    """Signal-group states {modality: [(k, H)]} -> media {modality: [items]} via output projector + generator."""
    out = {}
    for m, groups in states.items():
        if not groups:
            continue
        cond = model.output_projectors[m](torch.stack(list(groups)).to(model.device))
        out[m] = model.generators[m].generate(cond, seed=seed, steps=steps, guidance_scale=guidance_scale)
    return out


def reply_of(model: Any, decoded: Decoded, row: int, media: dict[str, list[Any]] | None = None) -> Reply:
    """Row `row` of a decode as a `Reply` (text decoded with special and signal tokens stripped)."""
    ids = decoded.tokens[row]
    reason = decoded.finish_reasons[row] if decoded.finish_reasons else None
    return Reply(model.tokenizer.decode(ids, skip_special_tokens=True).strip(), dict(media or {}), list(ids), reason)


@torch.no_grad()
def generate(model: Any, prompts: Sequence[Any], media: Sequence[Mapping[str, Sequence[Any]]] | None = None,
             max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             seed: int | None = None, generate_media: bool = True, media_steps: int | None = None,
             guidance_scale: float | None = None) -> list[Reply]:
    """`MMModel.generate`: a `Reply` per prompt, media drawn for each signal group the model emitted."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b = model.batch(prompts, media, add_generation_prompt=True, padding_side="left")
    decoded = decode_batch(model, b["input_ids"], b["attention_mask"], b["media"], max_new_tokens=max_new_tokens,
                           do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed)
    replies = []
    for row in range(len(decoded.tokens)):
        states = decoded.signals[row] if decoded.signals else {}
        drawn = draw(model, states, seed=seed, steps=media_steps, guidance_scale=guidance_scale) \
            if generate_media and model.signal_tokens is not None else {}
        replies.append(reply_of(model, decoded, row, drawn))
    return replies
