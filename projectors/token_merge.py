"""Token-merge input projector: concatenate every ``merge`` adjacent tokens along the channels, then one linear.

Used by MiniGPT-v2, which merges each 4 adjacent EVA-ViT tokens of a 448px image (1024 -> 256 tokens) by
concatenating their features (1408 -> 5632 channels) and projecting with one linear layer
to the LLM width; the LLM then sees a quarter of the tokens at no loss of information.
Adjacent means consecutive in the encoder's token order: in a ViT's row-major grid, runs
of ``merge`` horizontally neighbouring patches (MiniGPT-v2's 1D merge, not 2x2 squares).

Token count: ``in_tokens // merge``. A count that ``merge`` does not divide is an error
by default (naming both numbers); with ``pad: true`` the last group is completed with
zero vectors instead, giving ``ceil(in_tokens / merge)`` tokens.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmhub.interfaces import BuildContext, ComponentConfig, Projector, ProjectorConfig, TextContext


class TokenMergeConfig(ProjectorConfig):
    """Settings of `TokenMergeProjector`: tokens per group (MiniGPT-v2: 4), whether to zero-pad a short last group."""

    merge: int = Field(4, ge=1)
    pad: bool = False
    bias: bool = True


class TokenMergeProjector(Projector):
    """Concatenate each `merge` adjacent tokens (channels x merge) and map them with one linear (MiniGPT-v2)."""

    name: ClassVar[str] = "token_merge"
    Config: ClassVar[type[ComponentConfig]] = TokenMergeConfig
    tokens_doc: ClassVar[str] = "in_tokens // merge (merge must divide it; with pad: true, ceil(in_tokens / merge))"
    example_settings: ClassVar[dict[str, Any]] = {"merge": 4}

    @classmethod
    def num_tokens(cls, config: TokenMergeConfig, in_tokens: int) -> int:
        if in_tokens < 1:
            raise ValueError(f"{cls.name} needs at least 1 input token, got {in_tokens}")
        if in_tokens % config.merge:
            if config.pad:
                return math.ceil(in_tokens / config.merge)
            divisors = [d for d in range(2, min(in_tokens, 16) + 1) if in_tokens % d == 0]
            raise ValueError(f"{cls.name}: {in_tokens} input tokens are not divisible by merge={config.merge}; "
                             "fix: set "
                             f"merge to a divisor of {in_tokens} ({', '.join(map(str, divisors)) or '1'}) "
                             "or pad: true to zero-pad the last group")
        return in_tokens // config.merge

    def __init__(self, config: TokenMergeConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        assert config.in_dim is not None and config.out_dim is not None, "in_dim/out_dim are filled in by validation"
        self.proj = nn.Linear(config.in_dim * config.merge, config.out_dim, bias=config.bias)

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        N, T, C = features.shape
        merge = self.config.merge  # type: ignore[attr-defined]
        groups = self.num_tokens(self.config, T)  # type: ignore[arg-type]  # raises when merge does not divide T
        if groups * merge != T:
            features = F.pad(features, (0, 0, 0, groups * merge - T))
        # row-major reshape: group g's channels are [token g*m | token g*m+1 | ... | token g*m+m-1]
        return self.proj(features.reshape(N, groups, merge * C))  # (N, T, in) -> (N, T / merge, out)
