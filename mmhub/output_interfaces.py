"""The output side's component contracts (any-to-any models): output projectors and generators.

An `OutputProjector` maps the LLM's signal-token states to a generator's conditioning; a `Generator` (a diffusers
pipeline, typically) turns that conditioning into images, videos or `Audio`, and exposes its own text encoder for
decoding-side alignment. `mmhub.interfaces` re-exports every name here, so plugins import all contracts from there.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mmhub.component import BuildContext, Component, ComponentConfig, Kind


@dataclass(frozen=True)
class GeneratorFacts:
    """The conditioning a generator takes, known without loading weights.

    ``cond_len`` x ``cond_dim`` is the shape of one item's conditioning (Stable Diffusion 1.x:
    77 x 768 text-encoder states; 2.x: 77 x 1024; AudioLDM: 1 x 512, a pooled CLAP vector).
    """

    modality: str  # what it produces: image, video or audio
    cond_len: int
    cond_dim: int


@dataclass(frozen=True)
class Audio:
    """A generated (or loaded) audio clip: mono float samples in [-1, 1] and their rate."""

    samples: Any  # numpy float32 array (T,)
    sample_rate: int


class GeneratorConfig(ComponentConfig):
    """Settings every generator has: sampling steps and guidance, overridable per call."""

    steps: int = 25
    guidance_scale: float = 1.0


class Generator(Component):
    """Conditioning (N, cond_len, cond_dim) -> media: PIL images, videos (lists of PIL frames) or `Audio`.

    A generator also exposes its *own* text encoder (`encode_text`): decoding-side alignment
    trains the output projector to reproduce these features from the LLM's signal-token states,
    as NExT-GPT does.
    """

    kind: ClassVar[Kind] = "generator"
    Config: ClassVar[type[ComponentConfig]] = GeneratorConfig

    @classmethod
    @abstractmethod
    def describe(cls, config: ComponentConfig, ctx: BuildContext) -> GeneratorFacts:
        """Produced modality and conditioning shape for these settings, without loading weights."""

    @abstractmethod
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (N, cond_len, cond_dim) features from the generator's own text encoder (no grad needed)."""

    @abstractmethod
    def generate(self, cond: torch.Tensor, seed: int | None = None, steps: int | None = None,
                 guidance_scale: float | None = None) -> list[Any]:
        """(N, cond_len, cond_dim) conditioning -> N media items; `steps`/`guidance_scale` override the settings.

        With guidance > 1 the unconditional branch uses ``encode_text([""])``."""


@dataclass(frozen=True)
class OutputProjectorFacts:
    """What an output projector emits per item: (out_len, out_dim), to match a generator's conditioning."""

    in_dim: int
    out_len: int
    out_dim: int


class OutputProjectorConfig(ComponentConfig):
    """Settings every output projector has: input width and length (the LLM's hidden size and the
    spec's signal-token count), output length and width (the generator's conditioning shape);
    validation fills the ones left out."""

    in_dim: int | None = None
    in_len: int | None = None
    out_len: int | None = None
    out_dim: int | None = None


class OutputProjector(Component):
    """Signal-token hidden states (N, k, in_dim) -> generator conditioning (N, out_len, out_dim)."""

    kind: ClassVar[Kind] = "output_projector"
    Config: ClassVar[type[ComponentConfig]] = OutputProjectorConfig

    @classmethod
    def describe(cls, config: ComponentConfig, ctx: BuildContext) -> OutputProjectorFacts:
        """Output shape for these (filled-in) settings: out_len x out_dim as set. A projector whose
        output length is tied to its input (one row per signal token) overrides this."""
        return OutputProjectorFacts(config.in_dim, config.out_len, config.out_dim)

    @abstractmethod
    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """(N, k, in_dim) signal-token hidden states -> (N, out_len, out_dim)."""

