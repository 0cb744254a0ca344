"""The timed units of `benchmarks.llava`, for each side: batch preparation, one training step (forward, backward,
AdamW step), generation, trainability per stage, and the useful-FLOPs count used for MFU."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from mmhub import MMModel
from mmhub.packing import collate_packed, pack, spliced_length
from mmhub.processor import Encoded
from mmhub.splice import IGNORE

FLOPS_FORMULA = ("useful training FLOPs per step = 6 * N_projector * image_tokens + K * N_body * real_tokens + "
                 "K * N_head * label_tokens, with K = 4 in stage 1 (frozen LLM: forward + input-gradient backward) and "
                 "K = 6 in stage 2 (LLM trained); N_body = LLM parameters without the input embedding table (a lookup) "
                 "and without the LM head; N_head = the LM head (its logits are useful only where a label is); "
                 "real_tokens = non-padding tokens after image splicing (text + image tokens); label_tokens = tokens "
                 "with a loss; the frozen vision tower is not counted (its output is cacheable); attention score FLOPs "
                 "ignored. The same count is used for both sides, so the MFU ratio equals the throughput ratio. "
                 "MFU = FLOPs / step time / fp32 matmul peak.")


def set_trainable_mmhub(model: MMModel, stage: int) -> list[torch.nn.Parameter]:
    """Stage 1: projector only; stage 2: projector + the whole backbone. Returns the trainable parameters."""
    model.requires_grad_(False)
    model.projectors.requires_grad_(True)
    if stage == 2:
        model.backbone.requires_grad_(True)
    model.train()
    return [p for p in model.parameters() if p.requires_grad]


def set_trainable_hf(hf: Any, stage: int) -> list[torch.nn.Parameter]:
    """The same split on transformers' LLaVA (by parameter name: vision_tower / multi_modal_projector / the rest)."""
    hf.requires_grad_(False)
    for name, p in hf.named_parameters():
        if "multi_modal_projector" in name or (stage == 2 and "vision_tower" not in name):
            p.requires_grad_(True)
    hf.train()
    return [p for p in hf.parameters() if p.requires_grad]


def optimizer(params: Sequence[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The AdamW both sides step (torch defaults, lr 1e-5)."""
    if not params:
        raise ValueError("no trainable parameters")
    return torch.optim.AdamW(params, lr=1e-5)


def mmhub_batch(model: MMModel, encs: Sequence[Encoded], pack_len: int | None, cache_features: bool) -> dict[str, Any]:
    """mmhub forward kwargs: packed rows (`pack_len`) or right padding; encoder features precomputed (what the
    trainer's `cache_features` does) or media to encode in the step."""
    if pack_len:
        b = collate_packed(model.processor, encs, pack(encs, pack_len, spliced_length(model)))
    else:
        b = model.processor.collate(list(encs))
    kw: dict[str, Any] = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]}
    if b.get("segment_ids") is not None:
        kw["segment_ids"] = b["segment_ids"]
    if cache_features:
        with torch.no_grad():
            kw["features"] = model.encode_features(b["media"])
    else:
        kw["media"] = b["media"]
    return kw


def full_logits_target(model: MMModel, kw: dict[str, Any]) -> torch.Tensor:
    """Next-token targets (B, L'-1) over the spliced sequence, for the full-logits loss variant (computed untimed)."""
    with torch.no_grad():
        sp = model.prepare_inputs(kw["input_ids"], kw["attention_mask"], kw["labels"], kw.get("media"),
                                  features=kw.get("features"), segment_ids=kw.get("segment_ids"))
    labels = sp.labels
    if kw.get("segment_ids") is not None:
        labels = labels.masked_fill(sp.position_ids == 0, IGNORE)
    return labels[:, 1:]


def mmhub_step(model: MMModel, opt: torch.optim.Optimizer, kw: dict[str, Any],
               target: torch.Tensor | None = None) -> None:
    """One training step. With `target`, logits for every position and cross-entropy over all of them (the
    full-logits variant); else mmhub's loss, which projects only labelled positions."""
    opt.zero_grad(set_to_none=True)
    if target is None:
        loss = model(**kw, return_logits=False).loss
    else:
        out = model(**{k: v for k, v in kw.items() if k != "labels"}, return_logits=True)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE)
    loss.backward()
    opt.step()


def hf_step(hf: Any, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    """One transformers training step: forward with labels (its own loss), backward, AdamW step."""
    opt.zero_grad(set_to_none=True)
    hf(**batch).loss.backward()
    opt.step()


def mmhub_generate(model: MMModel, batch: dict[str, Any], new_tokens: int) -> int:
    """Greedy generation with mmhub's KV-cached path; returns the number of tokens generated (all rows)."""
    rows = model.generate_ids(batch["input_ids"], batch["attention_mask"], batch["media"], max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False)
    return sum(len(r) for r in rows)


@torch.no_grad()
def hf_generate(hf: Any, batch: dict[str, torch.Tensor], new_tokens: int, pad_id: int) -> int:
    """Greedy generation with transformers' `generate`; returns the number of new tokens (all rows)."""
    was = hf.training
    hf.eval()
    try:
        out = hf.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=batch["pixel_values"], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=pad_id)
    finally:
        hf.train(was)
    return int(out.shape[0] * (out.shape[1] - batch["input_ids"].shape[1]))


def parameter_counts(model: MMModel) -> dict[str, int]:
    """Parameters of the vision tower, the projector and the LLM (with and without the input embedding table)."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    llm = count(model.backbone)
    emb = model.backbone.model.get_input_embeddings().weight.numel()
    head = model.backbone.model.get_output_embeddings().weight.numel()
    return {"vision_tower": count(model.encoders), "projector": count(model.projectors), "llm": llm,
            "llm_without_input_embedding": llm - emb, "lm_head": head, "total": count(model)}


def useful_flops(params: dict[str, int], encs: Sequence[Encoded], image_tokens: int, placeholder: int,
                 stage: int) -> float:
    """FLOPS_FORMULA for one batch."""
    images = sum(s.input_ids.count(placeholder) for s in encs)
    real = sum(len(s.input_ids) for s in encs) + images * (image_tokens - 1)
    labelled = sum(sum(1 for t in s.labels if t != IGNORE) for s in encs)
    k = 4 if stage == 1 else 6
    body = params["llm_without_input_embedding"] - params["lm_head"]
    return 6.0 * params["projector"] * images * image_tokens + k * body * real + k * params["lm_head"] * labelled
