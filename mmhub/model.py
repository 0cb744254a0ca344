"""MMModel: encoders -> projectors -> spliced into the backbone; loss, logits and generation.

The model is plain composition of registered components (held in
``nn.ModuleDict``s keyed by modality) plus the processor that turns text and media
into inputs. Nothing here knows a concrete component class.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmhub.attention import packed_sequences
from mmhub.decoding import OWN_LOOP_SETTINGS, Decoded, Reply, decode
from mmhub.errors import InputError
from mmhub.interfaces import Backbone, InjectionContext, Injector, TextContext
from mmhub.packing import block_causal_mask, segment_lengths
from mmhub.processor import Messages, MMProcessor
from mmhub.signals import SignalTokens, token_names
from mmhub.splice import IGNORE, Spliced, compact, splice


@dataclass
class MMOutput:
    """What `MMModel.forward` returns."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None  # (B, L', vocab) over the spliced sequence
    labels: torch.Tensor | None  # (B, L') spliced labels (-100 where ignored); decoder targets for enc-dec
    num_target_tokens: int = 0
    aux_loss: torch.Tensor | None = None  # sum of the projectors' auxiliary losses (included in `loss`)
    sequence_logprobs: torch.Tensor | None = None  # (B,) summed log-probability of each row's labelled tokens (DPO)
    output_loss: torch.Tensor | None = None  # decoding-side alignment: MSE of projected signal states vs captions' features (in `loss`)


@dataclass
class Prepared:
    """Backbone-ready inputs plus what injectors and the loss need."""

    spliced: Spliced
    injection: InjectionContext | None
    aux_loss: torch.Tensor | None


class MMModel(nn.Module):
    """An assembled multimodal LLM. Build it with `mmhub.build(spec)` or `MMModel.from_pretrained(dir)`."""

    def __init__(self, plan: Any, encoders: Mapping[str, nn.Module], projectors: Mapping[str, nn.Module], backbone: Backbone,
                 injectors: Mapping[str, Injector] | None = None, output_projectors: Mapping[str, nn.Module] | None = None,
                 generators: Mapping[str, nn.Module] | None = None):
        super().__init__()
        self.plan = plan
        self.spec = plan.spec
        self.encoders = nn.ModuleDict(dict(encoders))  # a shared encoder appears under each of its modalities
        self.projectors = nn.ModuleDict(dict(projectors))
        self.backbone = backbone
        self.injectors = nn.ModuleDict(dict(injectors or {}))
        self.output_projectors = nn.ModuleDict(dict(output_projectors or {}))
        self.generators = nn.ModuleDict(dict(generators or {}))
        for inj in self.injectors.values():
            inj.attach(backbone)
        placeholders = {m: self.spec.placeholder(m) for m in self.encoders}
        # each marker must be one token that text never splits; ids past the embedding table are fine
        # because prepare_inputs replaces them before the lookup
        backbone.tokenizer.add_tokens([p for p in placeholders.values() if p not in backbone.tokenizer.get_vocab()],
                                      special_tokens=True)
        # the output side: k signal tokens per generated modality, with their own embedding/head rows
        self.signal_tokens = SignalTokens({m: self.spec.signal_count(m) for m in self.generators}, backbone.tokenizer,
                                          backbone.hidden_size, self.plan.backbone_facts.vocab_size) \
            if len(self.generators) else None
        if self.signal_tokens is not None:
            lm = getattr(backbone, "model", None)
            if lm is not None and hasattr(lm, "get_input_embeddings") and lm.get_output_embeddings() is not None:
                self.signal_tokens.init_from_tables(lm.get_input_embeddings().weight, lm.get_output_embeddings().weight)
        self.processor = MMProcessor(
            backbone.tokenizer, plan.template, placeholders,
            {m: (lambda item, _e=enc, _m=m: _e.preprocess(item, _m)) for m, enc in self.encoders.items()},
            signal_groups={m: "".join(token_names(m, self.spec.signal_count(m))) for m in self.generators})
        self._names = {self.processor.placeholder_ids[m]: p for m, p in placeholders.items()}

    # -- inputs ---------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        """Input modalities besides text, in spec order."""
        return list(self.encoders)

    @property
    def tokenizer(self) -> Any:
        return self.backbone.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.plan.backbone_facts.is_encoder_decoder)

    def encode_features(self, media: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{modality: (N, ...) preprocessed items} -> {modality: (N, T, enc_dim)} encoder features (what a feature
        cache stores for a frozen encoder)."""
        out = {}
        for m, items in media.items():
            if m not in self.encoders:
                raise InputError(f"got {m!r} items, but this model accepts {', '.join(self.encoders) or 'text only'}")
            out[m] = self.encoders[m](items.to(self.device), m)
        return out

    def encode_media(self, media: Mapping[str, torch.Tensor], text: Mapping[str, TextContext] | None = None,
                     features: Mapping[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """{modality: (N, ...) preprocessed items} -> ({modality: (N, T, hidden)} projected tokens, auxiliary loss).

        `text` gives text-reading projectors (``uses_text``) the text around each item; `features`
        holds precomputed encoder outputs (N, T, enc_dim) for modalities whose encoder is skipped.
        """
        out, aux = {}, []
        features = dict(features or {})
        feats_all = {**self.encode_features({m: t for m, t in media.items() if m not in features}),
                     **{m: f.to(self.device) for m, f in features.items()}}
        for m, feats in feats_all.items():
            if m not in self.projectors:
                raise InputError(f"got {m!r} features, but this model accepts {', '.join(self.encoders) or 'text only'}")
            proj = self.projectors[m]
            proj.aux_loss = None
            out[m] = proj(feats, (text or {}).get(m))  # (N, T', hidden)
            if getattr(proj, "aux_loss", None) is not None:
                aux.append(proj.aux_loss)
        return out, (torch.stack(aux).sum() if aux else None)

    def _text_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
                      text_embeds: torch.Tensor, modality: str, segment_ids: torch.Tensor | None = None) -> TextContext:
        """Per item of `modality`: its sample's prompt-side text (and answer side when labelled)."""
        ph = torch.zeros_like(input_ids, dtype=torch.bool)
        for pid in self.processor.placeholder_ids.values():
            ph |= input_ids == pid
        valid = attention_mask.bool() & ~ph
        prompt = valid if labels is None else valid & (labels == IGNORE)
        if segment_ids is not None:  # packed rows: each item reads only its own sample's text
            rows, cols = (input_ids == self.processor.placeholder_ids[modality]).nonzero(as_tuple=True)
            own = segment_ids[rows] == segment_ids[rows, cols][:, None]  # (N, L)
            ctx = TextContext(*compact(text_embeds[rows], prompt[rows] & own))
            if labels is not None:
                ctx.target, ctx.target_mask = compact(text_embeds[rows], valid[rows] & (labels[rows] != IGNORE) & own)
            return ctx
        inst, inst_mask = compact(text_embeds, prompt)
        rows = (input_ids == self.processor.placeholder_ids[modality]).nonzero(as_tuple=True)[0]
        ctx = TextContext(inst[rows], inst_mask[rows])
        if labels is not None:
            tgt, tgt_mask = compact(text_embeds, valid & (labels != IGNORE))
            ctx.target, ctx.target_mask = tgt[rows], tgt_mask[rows]
        return ctx

    def prepare_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       labels: torch.Tensor | None = None, media: Mapping[str, torch.Tensor] | None = None,
                       padding_side: str = "right", features: Mapping[str, torch.Tensor] | None = None,
                       segment_ids: torch.Tensor | None = None) -> Spliced:
        """Token ids (with one placeholder per media item) + media (or cached encoder features) -> backbone-ready embeddings.
        With `segment_ids` (packed rows) the result carries per-position segment ids and per-segment position ids."""
        return self._prepare(input_ids, attention_mask, labels, media, padding_side, features, segment_ids).spliced

    def _prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                 media: Mapping[str, torch.Tensor] | None, padding_side: str,
                 features: Mapping[str, torch.Tensor] | None = None, segment_ids: torch.Tensor | None = None) -> Prepared:
        if segment_ids is not None:
            self._check_packing()
            segment_ids = segment_ids.to(self.device)
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        labels = labels.to(self.device) if labels is not None else None
        media = media or {}
        features = features or {}
        given = set(media) | set(features)
        ph_ids = self.processor.placeholder_ids
        for m in self.encoders:
            if m not in given and bool((input_ids == ph_ids[m]).any()):
                n = int((input_ids == ph_ids[m]).sum())
                raise InputError(f"the text has {n} {self._names[ph_ids[m]]} placeholder(s) but 0 {m} items were given")
        safe_ids = input_ids.masked_fill(input_ids >= self.backbone_vocab_size, 0)  # placeholder ids may lie past the table
        text_embeds = self.backbone.embed(safe_ids)  # (B, L, H)
        if self.signal_tokens is not None:
            text_embeds = self.signal_tokens.embed_into(input_ids, text_embeds)
        text = {m: self._text_context(input_ids, attention_mask, labels, text_embeds, m, segment_ids)
                for m in given if m in self.projectors and getattr(self.projectors[m], "uses_text", False)}
        tokens, aux = self.encode_media(media, text, features)
        context = self.plan.context_modalities
        spliced_media = {}
        for m, t in tokens.items():
            if m in context:  # the injector cross-attends to the tokens; the text keeps one marker token per item
                t = self.injectors[context[m]].marker(m).to(t.dtype).expand(t.shape[0], 1, -1)
            spliced_media[ph_ids[m]] = t
        sp = splice(input_ids, text_embeds, attention_mask, labels, spliced_media, padding_side, self._names, segment_ids)
        injection = self._injection_context(input_ids, sp, tokens) if len(self.injectors) else None
        return Prepared(sp, injection, aux)

    def _check_packing(self) -> None:
        why = None
        if self.is_encoder_decoder:
            why = "an encoder-decoder backbone (its encoder and decoder sides are split per row)"
        elif len(self.injectors):
            why = f"injectors ({', '.join(self.injectors)}: they index media per row, not per packed sample)"
        elif not getattr(self.backbone, "supports_packing", False):
            why = f"the {getattr(self.backbone, 'name', type(self.backbone).__name__)} backbone (it takes no 4D attention mask)"
        if why:
            raise InputError(f"sequence packing (segment_ids) is not supported with {why}; "
                             "collate these samples unpacked (MMProcessor.collate) instead")

    def _injection_context(self, input_ids: torch.Tensor, sp: Spliced, tokens: Mapping[str, torch.Tensor]) -> InjectionContext:
        B = input_ids.shape[0]
        H = sp.inputs_embeds.shape[-1]
        origin = sp.origin.clamp(min=0)
        ph_ids = self.processor.placeholder_ids
        context = self.plan.context_modalities
        is_marker = torch.zeros_like(input_ids, dtype=torch.bool)
        media, valid, index = {}, {}, {}
        for m in context:
            hit = input_ids == ph_ids[m]  # (B, L)
            is_marker |= hit
            nth = hit.long().cumsum(1) - 1  # latest item at or before each input position (-1 before the first)
            index[m] = nth.gather(1, origin).masked_fill(sp.origin < 0, -1)  # (B, L')
            M = max(int(hit.sum(1).max()), 1)
            t = tokens.get(m)
            T = t.shape[1] if t is not None else 1
            media[m] = sp.inputs_embeds.new_zeros(B, M, T, H)
            valid[m] = torch.zeros(B, M, dtype=torch.bool, device=input_ids.device)
            if t is not None:
                b, _ = hit.nonzero(as_tuple=True)
                slot = nth[hit]
                media[m][b, slot] = t.to(media[m].dtype)
                valid[m][b, slot] = True
        positions = sp.media_positions & ~is_marker.gather(1, origin)
        return InjectionContext(media, valid, index, positions)

    @contextmanager
    def _injected(self, context: InjectionContext | None) -> Iterator[None]:
        for inj in self.injectors.values():
            inj.context = context
        try:
            yield
        finally:
            for inj in self.injectors.values():
                inj.context = None

    @property
    def backbone_vocab_size(self) -> int:
        return self.plan.backbone_facts.vocab_size

    # -- training forward -------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, media: Mapping[str, torch.Tensor] | None = None,
                padding_side: str = "right", return_logits: bool = True,
                features: Mapping[str, torch.Tensor] | None = None, segment_ids: torch.Tensor | None = None,
                outputs: Mapping[str, Sequence[str]] | None = None) -> MMOutput:
        """Loss (mean over target tokens) and logits. Logits are computed for every position only
        when `return_logits`; the loss itself only ever projects the positions that have labels.
        `features` replaces `media` for modalities whose (frozen) encoder output is cached.
        `segment_ids` (B, L) marks packed rows (`mmhub.packing.collate_packed`): attention stays causal
        within each sample, positions restart per sample, and no sample's first token is a target.
        `outputs` ({modality: captions}, one per signal group in the batch, row-major) adds the
        decoding-side alignment loss: the output projector's reading of each group's hidden states
        against the generator's own text features of the caption (MSE), as NExT-GPT trains it."""
        prep = self._prepare(input_ids, attention_mask, labels, media, padding_side, features, segment_ids)
        sp = prep.spliced
        if self.is_encoder_decoder:
            hidden, target, keep = self._seq2seq_hidden(sp)
        else:
            if sp.segment_ids is not None and sp.labels is not None:
                # packed rows: the last token of sample k never predicts the first token of sample k+1
                sp.labels = sp.labels.masked_fill(sp.position_ids == 0, IGNORE)
            keep = None
            if sp.labels is not None:
                target = sp.labels[:, 1:]  # token t predicts t+1
                keep = target != IGNORE
            with self._only_labelled(keep, return_logits or bool(outputs and any(outputs.values()))):
                if sp.segment_ids is not None:  # packed rows: a block-diagonal causal mask, one block per sample
                    with packed_sequences(segment_lengths(sp.segment_ids)):
                        hidden = self.backbone(sp.inputs_embeds, block_causal_mask(sp.segment_ids), sp.position_ids)
                else:
                    with self._injected(prep.injection):
                        hidden = self.backbone(sp.inputs_embeds, sp.attention_mask, sp.position_ids)  # (B, L', H)
        loss, n_target, seq_logp = None, 0, None
        if sp.labels is not None:
            n_target = int(keep.sum())
            seq_logp = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
            if n_target == 0:
                loss = hidden.sum() * 0.0  # keeps the graph; a batch with no targets contributes nothing
            else:
                h = hidden[keep] if self.is_encoder_decoder else hidden[:, :-1][keep]
                tgt = target[keep] if self.signal_tokens is None else self.signal_tokens.columns(target[keep])
                ce = self.label_cross_entropy(h, tgt)  # labelled positions only
                loss = ce.mean()
                seq_logp = seq_logp.index_add(0, keep.nonzero(as_tuple=True)[0], -ce)
            if prep.aux_loss is not None:
                loss = loss + prep.aux_loss
        output_loss = None
        if outputs and any(outputs.values()) and not self.is_encoder_decoder:
            output_loss = self._output_loss(input_ids.to(self.device), sp, hidden, outputs)
            loss = output_loss if loss is None else loss + output_loss
        logits = self.head(hidden) if return_logits else None
        labels_out = target if (self.is_encoder_decoder and sp.labels is not None) else sp.labels
        return MMOutput(loss=loss, logits=logits, labels=labels_out, num_target_tokens=n_target, aux_loss=prep.aux_loss,
                        sequence_logprobs=seq_logp, output_loss=output_loss)

    def _only_labelled(self, keep: torch.Tensor | None, all_states: bool) -> Any:
        """The backbone's `only_at` context for the positions whose final state the loss reads (`keep` (B, L-1):
        those followed by a label), when nothing else reads the states (no logits returned, no output-side loss);
        else no-op."""
        only_at = getattr(self.backbone, "only_at", None)
        if keep is None or all_states or only_at is None:
            return nullcontext()
        return only_at(F.pad(keep, (0, 1), value=False))  # the last position predicts nothing

    def label_cross_entropy(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-position cross-entropy of the head's logits at `hidden` (N, H) against `target` (N,) columns.

        With the spec's ``loss_chunk`` set and gradients on, the head and the loss run over chunks of that many
        positions under activation checkpointing: no chunk's logits outlive its own forward or backward, so peak
        memory holds one chunk's (chunk x vocabulary) logits instead of all N; the head's matmul runs once more
        in the backward pass. The loss and gradients equal the unchunked ones (up to float summation order)."""
        chunk = self.spec.loss_chunk
        ce = lambda h, t: F.cross_entropy(self.head(h).float(), t, reduction="none")  # noqa: E731
        if not chunk or hidden.shape[0] <= chunk or not torch.is_grad_enabled():
            return ce(hidden, target)
        from torch.utils.checkpoint import checkpoint

        return torch.cat([checkpoint(ce, hidden[i:i + chunk], target[i:i + chunk], use_reentrant=False)
                          for i in range(0, hidden.shape[0], chunk)])

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> logits over the backbone's vocabulary, plus one column per signal token when there are any."""
        base = self.backbone.logits(hidden)
        return base if self.signal_tokens is None else self.signal_tokens.logits(hidden, base)

    def signal_states(self, token_ids: torch.Tensor, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hidden states at signal-token positions, grouped per item: {modality: (N, k, H)} in row-major order.

        `token_ids` (B, L') holds the token id at each position of `hidden` (B, L', H) (-1 where none)."""
        if self.signal_tokens is None:
            return {}
        out = {}
        for m in self.signal_tokens.modalities:
            ids = torch.tensor(self.signal_tokens.ids_of(m), device=token_ids.device)
            hit = (token_ids[..., None] == ids).any(-1)
            n, k = int(hit.sum()), len(ids)
            if n == 0:
                continue
            if n % k:
                raise InputError(f"the text holds {n} {m} signal tokens, not a whole number of groups of {k}; "
                                 f"write one {self.processor.signal_groups[m][0]} marker per {m} to generate")
            out[m] = hidden[hit].reshape(n // k, k, -1)
        return out

    def caption_features(self, modality: str, captions: Sequence[str]) -> torch.Tensor:
        """The generator's own text features of `captions` (N, cond_len, cond_dim), cached per caption."""
        cache = self.__dict__.setdefault("_caption_cache", {})
        missing = [c for c in dict.fromkeys(captions) if (modality, c) not in cache]
        if missing:
            with torch.no_grad():
                feats = self.generators[modality].encode_text(list(missing))
            for c, f in zip(missing, feats):
                cache[(modality, c)] = f.detach()
        return torch.stack([cache[(modality, c)] for c in captions]).to(self.device)

    def _output_loss(self, input_ids: torch.Tensor, sp: Spliced, hidden: torch.Tensor,
                     outputs: Mapping[str, Sequence[str]]) -> torch.Tensor:
        token_ids = input_ids.gather(1, sp.origin.clamp(min=0)).masked_fill(sp.origin < 0, -1)
        token_ids = token_ids.masked_fill(sp.media_positions, -1)
        states = self.signal_states(token_ids, hidden)
        total = hidden.new_zeros(())
        for m, captions in outputs.items():
            if not captions:
                continue
            if m not in self.output_projectors:
                raise InputError(f"the batch has {m} output captions, but this model generates "
                                 f"{', '.join(self.output_projectors) or 'nothing'}")
            got = states.get(m)
            n = 0 if got is None else got.shape[0]
            if n != len(captions):
                raise InputError(f"{len(captions)} {m} output caption(s) but {n} signal group(s) in the text; write one "
                                 f"{self.processor.signal_groups[m][0]} marker per caption")
            pred = self.output_projectors[m](got)
            total = total + F.mse_loss(pred.float(), self.caption_features(m, captions).float())
        return total

    def _seq2seq_hidden(self, sp: Spliced) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Encoder-decoder backbones: prompt side (incl. media tokens) -> encoder, labelled tokens -> decoder.

        Returns decoder hidden states (B, Lt, H), the targets (B, Lt) and where they are real.
        Without labels the whole sequence goes to the encoder and the decoder sees only its start token.
        """
        real = sp.attention_mask.bool()
        if sp.labels is None:
            enc, enc_mask = sp.inputs_embeds, sp.attention_mask
            target = keep = None
            dec_in = torch.full((enc.shape[0], 1), self.backbone.decoder_start_token_id, device=enc.device)
            dec_mask = torch.ones_like(dec_in)
        else:
            enc, enc_mask = compact(sp.inputs_embeds, real & (sp.labels == IGNORE))
            target, keep = compact(sp.labels, real & (sp.labels != IGNORE), fill=IGNORE)
            start = torch.full_like(target[:, :1], self.backbone.decoder_start_token_id)
            dec_in = torch.cat([start, target[:, :-1].masked_fill(~keep[:, :-1], self.processor.pad_id)], 1)
            dec_mask = torch.cat([torch.ones_like(keep[:, :1]), keep[:, :-1]], 1).long()
        hidden = self.backbone(enc, enc_mask.long(), decoder_input_ids=dec_in, decoder_attention_mask=dec_mask)
        return hidden, target, keep

    # -- generation -------------------------------------------------------------------
    def batch(self, conversations: Sequence[str | Messages], media: Sequence[Mapping[str, Sequence[Any]]] | None = None,
              add_generation_prompt: bool = False, padding_side: str = "right") -> dict[str, Any]:
        """Tokenize and collate conversations with their media (one mapping per conversation)."""
        media = list(media) if media is not None else [{} for _ in conversations]
        if len(media) != len(conversations):
            raise InputError(f"{len(conversations)} conversations but {len(media)} media entries; give one per conversation")
        enc = [self.processor.encode(c, m, add_generation_prompt=add_generation_prompt, index=i)
               for i, (c, m) in enumerate(zip(conversations, media))]
        return self.processor.collate(enc, padding_side=padding_side)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str | Messages], media: Sequence[Mapping[str, Sequence[Any]]] | None = None,
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None, generate_media: bool = True, media_steps: int | None = None,
                 guidance_scale: float | None = None) -> list[Reply]:
        """Generate a reply per prompt (a user message or a conversation), with the backbone's KV cache.

        `media` holds one ``{modality: [items]}`` per prompt; items are PIL images, arrays or paths.
        Each reply is a `Reply`: the text (a ``str``, signal tokens stripped) with ``reply.media``
        holding what the model's generators drew for each signal group it emitted ({} for models
        without an output side; `generate_media=False` skips the generators). `media_steps` and
        `guidance_scale` override the generators' own sampling settings; `seed` seeds them too.
        """
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        b = self.batch(prompts, media, add_generation_prompt=True, padding_side="left")
        settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed)
        if self.signal_tokens is None:
            ids = self.generate_ids(b["input_ids"], b["attention_mask"], b["media"], **settings)
            return [Reply(self.tokenizer.decode(row, skip_special_tokens=True).strip()) for row in ids]
        decoded = self._decode(b["input_ids"], b["attention_mask"], b["media"], **settings)
        replies = []
        for row, states in zip(decoded.tokens, decoded.signals):
            drawn = self.draw(states, seed=seed, steps=media_steps, guidance_scale=guidance_scale) if generate_media else {}
            replies.append(Reply(self.tokenizer.decode(row, skip_special_tokens=True).strip(), drawn))
        return replies

    @torch.no_grad()
    def draw(self, states: Mapping[str, Sequence[torch.Tensor]], seed: int | None = None, steps: int | None = None,
             guidance_scale: float | None = None) -> dict[str, list[Any]]:
        """Signal-group states {modality: [(k, H)]} -> media {modality: [items]} via output projector + generator."""
        out = {}
        for m, groups in states.items():
            if not groups:
                continue
            cond = self.output_projectors[m](torch.stack(list(groups)).to(self.device))
            out[m] = self.generators[m].generate(cond, seed=seed, steps=steps, guidance_scale=guidance_scale)
        return out

    def _own_loop(self, settings: Mapping[str, Any]) -> bool:
        """Whether `generate_ids` may use mmhub's decode loop for these settings (see there)."""
        return (not self.is_encoder_decoder and not len(self.injectors) and hasattr(self.backbone, "step")
                and set(settings) <= OWN_LOOP_SETTINGS)

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, media: Mapping[str, torch.Tensor] | None,
                seed: int | None = None, **kwargs: Any) -> Decoded:
        """mmhub's own decode loop (`mmhub.decoding`): models with signal tokens, and plain decoder-only ones."""
        was_training = self.training
        self.eval()
        try:
            sp = self._prepare(input_ids, attention_mask, None, media, padding_side="left").spliced
            suppress = [i for i in self.processor.placeholder_ids.values()
                        if self.signal_tokens is not None or i < self.backbone_vocab_size]
            return decode(self, sp.inputs_embeds, sp.attention_mask, sp.position_ids, stop_ids=self.stop_token_ids(),
                          suppress_ids=suppress, seed=seed, **kwargs)
        finally:
            self.train(was_training)

    def stream(self, prompt: str | Messages, media: Mapping[str, Sequence[Any]] | None = None,
               **settings: Any) -> Iterator[str]:
        """The reply to one prompt as it grows (see `mmhub.streaming`); settings as for `generate`."""
        from mmhub.streaming import stream_reply

        return stream_reply(self, prompt, media, **settings)

    @torch.no_grad()
    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     media: Mapping[str, torch.Tensor] | None = None, seed: int | None = None, **kwargs: Any) -> list[list[int]]:
        """Left-padded ids + media -> generated token ids per row (stop tokens removed).

        Decoder-only models without injectors decode with mmhub's own KV-cached loop (`mmhub.decoding`:
        greedy or temperature/top-p sampling, ``min_new_tokens``, a streamer), which skips the per-token
        bookkeeping of transformers' ``generate`` and gives the same greedy tokens; any other setting
        (beams, repetition penalty, ...) and the other models go through the backbone's ``generate``."""
        if self.signal_tokens is not None or self._own_loop(kwargs):
            return self._decode(input_ids, attention_mask, media, seed=seed, **kwargs).tokens
        was_training = self.training
        self.eval()
        try:
            prep = self._prepare(input_ids, attention_mask, None, media, padding_side="left")
            sp = prep.spliced
            stop_ids = self.stop_token_ids()
            if seed is not None:
                torch.manual_seed(seed)
            # the model must never "write" a media placeholder; ids past the LM head cannot be sampled anyway
            suppress = [i for i in self.processor.placeholder_ids.values() if i < self.backbone_vocab_size]
            with self._injected(prep.injection):
                out = self.backbone.generate(sp.inputs_embeds, sp.attention_mask, eos_token_id=stop_ids,
                                             pad_token_id=self.processor.pad_id, suppress_tokens=suppress or None, **kwargs)
        finally:
            self.train(was_training)
        rows = []
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
            rows.append(row[:cut])
        return rows

    def stop_token_ids(self) -> list[int]:
        tok = self.tokenizer
        ids = []
        for s in self.plan.template.stop_strings(tok):
            tid = tok.convert_tokens_to_ids(s)
            if isinstance(tid, int) and tid != tok.unk_token_id and tid not in ids:
                ids.append(tid)
        return ids

    # -- persistence ------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, full: bool = False) -> Path:
        """Write the resolved spec and the weights not recoverable from weight sources (all with `full`)."""
        from mmhub.checkpoint import save_model

        return save_model(self, Path(path), full=full)

    @classmethod
    def from_pretrained(cls, path: str | Path, registry: Any = None) -> "MMModel":
        """Rebuild a saved model folder (spec + safetensors); outputs are identical to the saved model's."""
        from mmhub.checkpoint import load_model

        return load_model(Path(path), registry=registry)

    def parameter_table(self) -> list[dict[str, Any]]:
        """Per component: slot, type, plugin, parameter count and trainable count."""
        from mmhub.stages import slots

        return [_row(path, mod) for path, mod in slots(self)]


def _row(path: str, mod: nn.Module) -> dict[str, Any]:
    return {"slot": path, "type": getattr(mod, "name", type(mod).__name__),
            "params": sum(p.numel() for p in mod.parameters()),
            "trainable": sum(p.numel() for p in mod.parameters() if p.requires_grad)}
