"""MMModel: encoders -> projectors -> spliced into the backbone; loss, logits and generation.

The model is plain composition of registered components (held in
``nn.ModuleDict``s keyed by modality) plus the processor that turns text and media
into inputs. Nothing here knows a concrete component class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmhub.errors import InputError
from mmhub.interfaces import Backbone
from mmhub.processor import Messages, MMProcessor
from mmhub.splice import IGNORE, Spliced, splice


@dataclass
class MMOutput:
    """What `MMModel.forward` returns."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None  # (B, L', vocab) over the spliced sequence
    labels: torch.Tensor | None  # (B, L') spliced labels (-100 where ignored)
    num_target_tokens: int = 0


class MMModel(nn.Module):
    """An assembled multimodal LLM. Build it with `mmhub.build(spec)` or `MMModel.from_pretrained(dir)`."""

    def __init__(self, plan: Any, encoders: Mapping[str, nn.Module], projectors: Mapping[str, nn.Module], backbone: Backbone):
        super().__init__()
        self.plan = plan
        self.spec = plan.spec
        self.encoders = nn.ModuleDict(dict(encoders))
        self.projectors = nn.ModuleDict(dict(projectors))
        self.backbone = backbone
        placeholders = {m: self.spec.placeholder(m) for m in self.encoders}
        # each marker must be one token that text never splits; ids past the embedding table are fine
        # because prepare_inputs replaces them before the lookup
        backbone.tokenizer.add_tokens([p for p in placeholders.values() if p not in backbone.tokenizer.get_vocab()],
                                      special_tokens=True)
        self.processor = MMProcessor(
            backbone.tokenizer, plan.template, placeholders,
            {m: (lambda item, _e=enc, _m=m: _e.preprocess(item, _m)) for m, enc in self.encoders.items()})
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

    def encode_media(self, media: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{modality: (N, ...) preprocessed items} -> {modality: (N, T, hidden)} projected tokens."""
        out = {}
        for m, items in media.items():
            if m not in self.encoders:
                raise InputError(f"got {m!r} items, but this model accepts {', '.join(self.encoders) or 'text only'}")
            feats = self.encoders[m](items.to(self.device), m)  # (N, T, enc_dim)
            out[m] = self.projectors[m](feats)  # (N, T', hidden)
        return out

    def prepare_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       labels: torch.Tensor | None = None, media: Mapping[str, torch.Tensor] | None = None,
                       padding_side: str = "right") -> Spliced:
        """Token ids (with one placeholder per media item) + media -> backbone-ready embeddings."""
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        labels = labels.to(self.device) if labels is not None else None
        tokens = self.encode_media(media or {})
        ph_ids = self.processor.placeholder_ids
        for m in self.encoders:
            if m not in tokens and bool((input_ids == ph_ids[m]).any()):
                n = int((input_ids == ph_ids[m]).sum())
                raise InputError(f"the text has {n} {self._names[ph_ids[m]]} placeholder(s) but 0 {m} items were given")
        safe_ids = input_ids.masked_fill(input_ids >= self.backbone_vocab_size, 0)  # placeholder ids may lie past the table
        text_embeds = self.backbone.embed(safe_ids)  # (B, L, H)
        return splice(input_ids, text_embeds, attention_mask, labels,
                      {ph_ids[m]: t for m, t in tokens.items()}, padding_side, self._names)

    @property
    def backbone_vocab_size(self) -> int:
        return self.plan.backbone_facts.vocab_size

    # -- training forward -------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, media: Mapping[str, torch.Tensor] | None = None,
                padding_side: str = "right", return_logits: bool = True) -> MMOutput:
        """Loss (mean over target tokens) and logits. Logits are computed for every position only
        when `return_logits`; the loss itself only ever projects the positions that have labels."""
        sp = self.prepare_inputs(input_ids, attention_mask, labels, media, padding_side)
        hidden = self.backbone(sp.inputs_embeds, sp.attention_mask, sp.position_ids)  # (B, L', H)
        loss, n_target = None, 0
        if sp.labels is not None:
            target = sp.labels[:, 1:]  # token t predicts t+1
            keep = target != IGNORE
            n_target = int(keep.sum())
            if n_target == 0:
                loss = hidden.sum() * 0.0  # keeps the graph; a batch with no targets contributes nothing
            else:
                logits_t = self.backbone.logits(hidden[:, :-1][keep])  # (n_target, vocab)
                loss = F.cross_entropy(logits_t.float(), target[keep])
        logits = self.backbone.logits(hidden) if return_logits else None
        return MMOutput(loss=loss, logits=logits, labels=sp.labels, num_target_tokens=n_target)

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
                 seed: int | None = None) -> list[str]:
        """Generate a reply per prompt (a user message or a conversation), with the backbone's KV cache.

        `media` holds one ``{modality: [items]}`` per prompt; items are PIL images, arrays or paths.
        """
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        b = self.batch(prompts, media, add_generation_prompt=True, padding_side="left")
        ids = self.generate_ids(b["input_ids"], b["attention_mask"], b["media"], max_new_tokens=max_new_tokens,
                                do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]

    @torch.no_grad()
    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     media: Mapping[str, torch.Tensor] | None = None, seed: int | None = None, **kwargs: Any) -> list[list[int]]:
        """Left-padded ids + media -> generated token ids per row (stop tokens removed)."""
        was_training = self.training
        self.eval()
        try:
            sp = self.prepare_inputs(input_ids, attention_mask, None, media, padding_side="left")
            stop_ids = self.stop_token_ids()
            if seed is not None:
                torch.manual_seed(seed)
            # the model must never "write" a media placeholder; ids past the LM head cannot be sampled anyway
            suppress = [i for i in self.processor.placeholder_ids.values() if i < self.backbone_vocab_size]
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
        rows = []
        for part, modules in (("encoders", self.encoders), ("projectors", self.projectors)):
            for m, mod in modules.items():
                rows.append(_row(f"{part}.{m}", mod))
        rows.append(_row("backbone", self.backbone))
        return rows


def _row(path: str, mod: nn.Module) -> dict[str, Any]:
    return {"slot": path, "type": getattr(mod, "name", type(mod).__name__),
            "params": sum(p.numel() for p in mod.parameters()),
            "trainable": sum(p.numel() for p in mod.parameters() if p.requires_grad)}
