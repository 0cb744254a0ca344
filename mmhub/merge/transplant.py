"""`mmhub transplant`: a model's encoders, projectors and output side onto another backbone of the same family.

A projector learns to write into one LLM's input-embedding space; it carries over to another LLM only if that
LLM reads the same space (a base and its instruct tune, a model and its fine-tune). Before anything is changed,
`embedding_agreement` measures it: the mean cosine similarity between the two backbones' input-embedding rows of
the tokens both tokenizers share (matched by token string). Below `min_cosine` the transplant is refused with the
number, unless forced. The backbone component types and every tensor shape must match (a different family is
refused with the tensor and both shapes); the source's signal tokens and tokenizer stay, so the target's tokenizer
must hold the same vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmhub.errors import MMHubError


@dataclass(frozen=True)
class Agreement:
    """How alike two backbones' input embeddings are over their shared tokens."""

    shared_tokens: int
    mean_cosine: float
    min_cosine: float


def _embeddings(model: Any) -> torch.Tensor:
    lm = getattr(model.backbone, "model", None)
    if lm is None or not hasattr(lm, "get_input_embeddings"):
        raise MMHubError(f"the backbone {type(model.backbone).__name__} exposes no input embeddings; transplant "
                         "needs a transformers backbone")
    return lm.get_input_embeddings().weight.detach()


@torch.no_grad()
def embedding_agreement(source: Any, target: Any) -> Agreement:
    """Mean (and worst) cosine between the two backbones' embedding rows of the tokens both vocabularies hold."""
    a, b = _embeddings(source), _embeddings(target)
    va, vb = source.tokenizer.get_vocab(), target.tokenizer.get_vocab()
    pairs = [(i, vb[t]) for t, i in va.items() if t in vb and i < a.shape[0] and vb[t] < b.shape[0]]
    if not pairs or a.shape[1] != b.shape[1]:
        return Agreement(len(pairs) if a.shape[1] == b.shape[1] else 0, 0.0, 0.0)
    ia, ib = (torch.tensor(x) for x in zip(*pairs, strict=True))
    cos = torch.nn.functional.cosine_similarity(a[ia].double(), b[ib].double(), dim=-1)
    return Agreement(len(pairs), float(cos.mean()), float(cos.min()))


@torch.no_grad()
def transplant(source: Any, target: Any, min_cosine: float = 0.5, force: bool = False) -> tuple[Any, Agreement]:
    """`source` with its backbone's tensors replaced by `target`'s (in place); refuses mismatches and, below
    `min_cosine` agreement, unless `force`."""
    problems = []
    st, tt = type(source.backbone).__name__, type(target.backbone).__name__
    if st != tt:
        problems.append(f"the backbones are different components ({st} vs {tt})")
    if source.tokenizer.get_vocab() != target.tokenizer.get_vocab():
        problems.append(f"the tokenizers differ ({len(source.tokenizer)} vs {len(target.tokenizer)} tokens); the "
                        "source's projectors and signal tokens index the source's vocabulary")
    mine, theirs = source.backbone.state_dict(), target.backbone.state_dict()
    for key, t in mine.items():
        if key not in theirs:
            problems.append(f"backbone tensor {key} is missing from the target")
        elif tuple(theirs[key].shape) != tuple(t.shape):
            problems.append(f"backbone tensor {key} is {tuple(t.shape)} in the source but {tuple(theirs[key].shape)} "
                            "in the target: not the same family")
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:20])
        raise MMHubError(f"transplant refused: {len(problems)} problem(s):\n{listed}")
    agreement = embedding_agreement(source, target)
    if agreement.mean_cosine < min_cosine and not force:
        raise MMHubError(f"transplant refused: the backbones' input embeddings agree with mean cosine "
                         f"{agreement.mean_cosine:.3f} over {agreement.shared_tokens} shared tokens, below "
                         f"{min_cosine}; the projector would write into a space the target does not read. Pass "
                         "--force to transplant anyway (and retrain the projector), or lower --min-cosine")
    for key, t in mine.items():
        t.copy_(theirs[key])
    return source, agreement


def transplant_folders(source: str, target: str, out: str | Path, min_cosine: float = 0.5, force: bool = False,
                       allow_paths: list[str | Path] | None = None) -> tuple[Path, Agreement]:
    """Load both models, transplant, save the result self-contained (atomically); returns (folder, agreement)."""
    from mmhub.loading import load

    model, agreement = transplant(load(source, allow_paths=allow_paths), load(target, allow_paths=allow_paths),
                                  min_cosine, force)
    return model.save_pretrained(out, full=True), agreement
