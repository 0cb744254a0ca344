"""MMModel: encoders -> projectors -> spliced into the backbone; the forward pass and the public entry points.

The model is plain composition of registered components (held in ``nn.ModuleDict``s keyed by modality)
plus the processor that turns text and media into inputs. Nothing here knows a concrete component class.
The work behind the entry points lives in its own modules: input preparation (`mmhub.inputs`), the losses
(`mmhub.losses`), generation (`mmhub.generation`, `mmhub.decoding`, `mmhub.streaming`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from mmhub import generation, inputs, losses, passes
from mmhub.errors import InputError
from mmhub.interfaces import Backbone, Injector, TextContext
from mmhub.processor import Messages, MMProcessor
from mmhub.reply import Reply
from mmhub.signals import SignalTokens, token_names
from mmhub.splice import Spliced
from mmhub.streaming import stream_reply


@dataclass
class MMOutput:
    """What `MMModel.forward` returns."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None  # (B, L', vocab) over the spliced sequence
    labels: torch.Tensor | None  # (B, L') spliced labels (-100 where ignored); decoder targets for enc-dec
    num_target_tokens: int = 0
    aux_loss: torch.Tensor | None = None  # sum of the projectors' auxiliary losses (included in `loss`)
    router_loss: torch.Tensor | None = None  # a mixture-of-experts backbone's weighted balance loss (in `loss`)
    sequence_logprobs: torch.Tensor | None = None  # (B,) summed log-probability of each row's labelled tokens (DPO)
    output_loss: torch.Tensor | None = None  # decoding-side alignment: MSE of signal states vs captions' features


class MMModel(nn.Module):
    """An assembled multimodal LLM. Build it with `mmhub.build(spec)` or `MMModel.from_pretrained(dir)`."""

    def __init__(self, plan: Any, encoders: Mapping[str, nn.Module], projectors: Mapping[str, nn.Module],
                 backbone: Backbone, injectors: Mapping[str, Injector] | None = None,
                 output_projectors: Mapping[str, nn.Module] | None = None,
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
        self.signal_tokens = self._signal_tokens()
        self.processor = MMProcessor(
            backbone.tokenizer, plan.template, placeholders,
            {m: (lambda item, _e=enc, _m=m: _e.preprocess(item, _m)) for m, enc in self.encoders.items()},
            signal_groups={m: "".join(token_names(m, self.spec.signal_count(m))) for m in self.generators})
        self.placeholder_names = {self.processor.placeholder_ids[m]: p for m, p in placeholders.items()}
        self._caption_features = losses.CaptionFeatures()

    def _signal_tokens(self) -> SignalTokens | None:
        """The output side: k signal tokens per generated modality, with their own embedding/head rows."""
        if not len(self.generators):
            return None
        sig = SignalTokens({m: self.spec.signal_count(m) for m in self.generators}, self.backbone.tokenizer,
                           self.backbone.hidden_size, self.plan.backbone_facts.vocab_size)
        lm = self.backbone.language_model()
        if lm is not None and lm.get_output_embeddings() is not None:
            sig.init_from_tables(lm.get_input_embeddings().weight, lm.get_output_embeddings().weight)
        return sig

    # -- composition ----------------------------------------------------------------
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

    @property
    def backbone_vocab_size(self) -> int:
        return self.plan.backbone_facts.vocab_size

    def encode_features(self, media: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{modality: (N, ...) preprocessed items} -> {modality: (N, T, enc_dim)} encoder features (what a feature
        cache stores for a frozen encoder)."""
        out = {}
        for m, items in media.items():
            if m not in self.encoders:
                raise InputError(f"got {m!r} items, but this model accepts {', '.join(self.encoders) or 'text only'}")
            # items preprocessed to different shapes (dynamic resolution) come as a list
            items = [t.to(self.device) for t in items] if isinstance(items, list) else items.to(self.device)
            out[m] = self.encoders[m](items, m)
        return out

    def encode_media(self, media: Mapping[str, torch.Tensor], text: Mapping[str, TextContext] | None = None,
                     features: Mapping[str, torch.Tensor] | None = None
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """{modality: (N, ...) preprocessed items} -> ({modality: (N, T, hidden)} projected tokens, auxiliary loss).

        `text` gives text-reading projectors (``uses_text``) the text around each item; `features`
        holds precomputed encoder outputs (N, T, enc_dim) for modalities whose encoder is skipped.
        """
        return inputs.project_media(self, media, text, features)

    def prepare_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       labels: torch.Tensor | None = None, media: Mapping[str, torch.Tensor] | None = None,
                       padding_side: str = "right", features: Mapping[str, torch.Tensor] | None = None,
                       segment_ids: torch.Tensor | None = None) -> Spliced:
        """Token ids (one placeholder per media item) + media (or cached encoder features) -> backbone-ready
        embeddings (`mmhub.inputs`). With `segment_ids` (packed rows) the result carries per-position segment ids
        and per-segment position ids."""
        return inputs.prepare(self, input_ids, attention_mask, labels, media, padding_side, features,
                              segment_ids).spliced

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
        decoding-side alignment loss (`mmhub.losses.output_loss`), as NExT-GPT trains it."""
        prep = inputs.prepare(self, input_ids, attention_mask, labels, media, padding_side, features, segment_ids)
        sp = prep.spliced
        aligned = bool(outputs and any(outputs.values()))
        self.backbone.router_loss = None
        if self.is_encoder_decoder:
            hidden, target, keep = passes.encoder_decoder(self, sp)
        else:
            hidden, target, keep = passes.decoder_only(self, prep, all_states=return_logits or aligned)
        router_loss = self.backbone.router_loss
        loss, n_target, seq_logp = None, 0, None
        if sp.labels is not None:
            loss, n_target, seq_logp = losses.label_losses(self, hidden, target, keep)
            if prep.aux_loss is not None:
                loss = loss + prep.aux_loss
            if router_loss is not None:
                loss = loss + router_loss
        output_loss = None
        if aligned and not self.is_encoder_decoder:
            output_loss = losses.output_loss(self, input_ids.to(self.device), sp, hidden, outputs)
            loss = output_loss if loss is None else loss + output_loss
        logits = self.head(hidden) if return_logits else None
        labels_out = target if (self.is_encoder_decoder and sp.labels is not None) else sp.labels
        return MMOutput(loss=loss, logits=logits, labels=labels_out, num_target_tokens=n_target, aux_loss=prep.aux_loss,
                        sequence_logprobs=seq_logp, output_loss=output_loss, router_loss=router_loss)

    # -- heads and losses (mmhub.losses) ------------------------------------------------
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> logits over the backbone's vocabulary, plus one column per signal token when there are any."""
        base = self.backbone.logits(hidden)
        return base if self.signal_tokens is None else self.signal_tokens.logits(hidden, base)

    def label_cross_entropy(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-position cross-entropy of the head's logits at `hidden` (N, H) against `target` (N,) columns,
        chunked by ``runtime.loss_chunk`` (`mmhub.losses.label_cross_entropy`)."""
        return losses.label_cross_entropy(self, hidden, target)

    def signal_states(self, token_ids: torch.Tensor, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hidden states at signal-token positions, grouped per item: {modality: (N, k, H)} in row-major order.

        `token_ids` (B, L') holds the token id at each position of `hidden` (B, L', H) (-1 where none)."""
        return losses.signal_states(self, token_ids, hidden)

    def caption_features(self, modality: str, captions: Sequence[str]) -> torch.Tensor:
        """The generator's own text features of `captions` (N, cond_len, cond_dim), cached per caption."""
        return self._caption_features(self.generators, modality, captions, self.device)

    # -- generation (mmhub.generation) ----------------------------------------------------
    def batch(self, conversations: Sequence[str | Messages], media: Sequence[Mapping[str, Sequence[Any]]] | None = None,
              add_generation_prompt: bool = False, padding_side: str = "right") -> dict[str, Any]:
        """Tokenize and collate conversations with their media (one mapping per conversation)."""
        return self.processor.batch(conversations, media, add_generation_prompt, padding_side)

    def generate(self, prompts: Sequence[str | Messages], media: Sequence[Mapping[str, Sequence[Any]]] | None = None,
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None, generate_media: bool = True, media_steps: int | None = None,
                 guidance_scale: float | None = None) -> list[Reply]:
        """Generate a `Reply` per prompt (a user message or a conversation), with the backbone's KV cache.

        `media` holds one ``{modality: [items]}`` per prompt; items are PIL images, arrays or paths. A reply holds
        the text (signal tokens stripped), ``media``: what the model's generators drew for each signal group it
        emitted ({} for models without an output side; `generate_media=False` skips the generators), the token
        ids and the finish reason. `media_steps` and `guidance_scale` override the generators' own sampling
        settings; `seed` seeds them too."""
        return generation.generate(self, prompts, media, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                   temperature=temperature, top_p=top_p, seed=seed, generate_media=generate_media,
                                   media_steps=media_steps, guidance_scale=guidance_scale)

    def stream(self, prompt: str | Messages, media: Mapping[str, Sequence[Any]] | None = None,
               **settings: Any) -> Iterator[Reply]:
        """The reply to one prompt as it grows, then finished (see `mmhub.streaming`); settings as for `generate`."""
        return stream_reply(self, prompt, media, **settings)

    def draw(self, states: Mapping[str, Sequence[torch.Tensor]], seed: int | None = None, steps: int | None = None,
             guidance_scale: float | None = None) -> dict[str, list[Any]]:
        """Signal-group states {modality: [(k, H)]} -> media {modality: [items]} via output projector + generator."""
        return generation.draw(self, states, seed=seed, steps=steps, guidance_scale=guidance_scale)

    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     media: Mapping[str, torch.Tensor] | None = None, seed: int | None = None,
                     **kwargs: Any) -> list[list[int]]:
        """Left-padded ids + media -> generated token ids per row (stop tokens removed).

        One decode path (`mmhub.generation.decode_batch`): mmhub's own KV-cached loop for decoder-only backbones
        that declare ``supports_step`` (greedy or temperature/top-p sampling, ``min_new_tokens``, a streamer);
        any other setting (beams, repetition penalty, ...) and the other models fall back to the backbone's
        transformers ``generate``, which gives the same greedy tokens."""
        return generation.decode_batch(self, input_ids, attention_mask, media, seed=seed, **kwargs).tokens

    def stop_token_ids(self) -> list[int]:
        """The tokenizer ids that end a reply (the chat template's stop strings)."""
        return generation.stop_token_ids(self)

    # -- persistence ------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, full: bool = False, storage_dtype: str | None = None) -> Path:
        """Write the resolved spec and the weights not recoverable from weight sources (all with `full`);
        `storage_dtype` ``float16``/``bfloat16`` stores the float32 tensors smaller (loading casts them back)."""
        from mmhub.checkpoint import save_model

        return save_model(self, Path(path), full=full, storage_dtype=storage_dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, registry: Any = None, verify: bool = True, **options: Any) -> "MMModel":
        """Rebuild a saved model folder (spec + safetensors); outputs are identical to the saved model's.
        `options` as for `mmhub.loading.load_folder` (allow_paths, allow_nonfinite)."""
        from mmhub.loading import load_folder  # the loader sits above the model (it assembles one)

        return load_folder(Path(path), registry=registry, verify=verify, **options)

    def parameter_table(self) -> list[dict[str, Any]]:
        """Per component: slot, type, plugin, parameter count and trainable count."""
        from mmhub.regimes import slots

        return [_row(path, mod) for path, mod in slots(self)]


def _row(path: str, mod: nn.Module) -> dict[str, Any]:
    return {"slot": path, "type": getattr(mod, "name", type(mod).__name__),
            "params": sum(p.numel() for p in mod.parameters()),
            "trainable": sum(p.numel() for p in mod.parameters() if p.requires_grad)}
