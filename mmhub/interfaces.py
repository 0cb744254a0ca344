"""One abstract interface per component kind, declaring what assembly needs to know.

Assembly (`mmhub.assembly`) and validation (`mmhub.validation`) only ever talk to
these interfaces, never to concrete classes. A component is a `torch.nn.Module`
subclass with:

* ``name``: the registered name a spec's ``type:`` refers to;
* ``Config``: a pydantic model of its settings (unknown settings are errors);
* class-level metadata (modalities consumed/produced, how its output width and
  token count are determined) shown by ``mmhub plugins``;
* a ``describe`` classmethod that states output width / token counts from the
  settings alone, *before any weights load*, so a spec can be checked cheaply.
"""

from __future__ import annotations

from abc import abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch

from mmhub.component import KINDS, BuildContext, Component, ComponentConfig, Kind  # noqa: F401  (re-exported for plugins)
from mmhub.output_interfaces import (  # noqa: F401  (the output side's contracts, re-exported for plugins)
    Audio,
    Generator,
    GeneratorConfig,
    GeneratorFacts,
    OutputProjector,
    OutputProjectorConfig,
    OutputProjectorFacts,
)


@dataclass(frozen=True)
class EncoderFacts:
    """What an encoder emits per media item, known without loading weights.

    An encoder that accepts several modalities (an ImageBind-like one) may emit a
    different number of tokens for each: ``tokens_by_modality`` overrides
    ``tokens_per_item`` for those modalities. An encoder whose `Encoder.arrange` leaves fewer real
    tokens than `forward` emits (pooling after the projector: OneVision's video frames, AnyRes'
    ``anyres_max_N``) states the most an item can occupy in the sequence in ``spliced_by_modality``:
    the token budget counts that.
    """

    out_dim: int
    tokens_per_item: int
    tokens_by_modality: dict[str, int] = field(default_factory=dict)
    spliced_by_modality: dict[str, int] = field(default_factory=dict)

    def tokens_for(self, modality: str) -> int:
        """Tokens per item of `modality`."""
        return self.tokens_by_modality.get(modality, self.tokens_per_item)

    def spliced_for(self, modality: str) -> int:
        """The most sequence tokens an item of `modality` occupies (at most `tokens_for`)."""
        return min(self.spliced_by_modality.get(modality, self.tokens_for(modality)), self.tokens_for(modality))


class Encoder(Component):
    """Media items of one or more modalities -> a sequence of feature vectors per item."""

    kind: ClassVar[Kind] = "encoder"

    @classmethod
    @abstractmethod
    def describe(cls, config: ComponentConfig, ctx: BuildContext) -> EncoderFacts:
        """Output width and tokens per item for these settings, without loading weights."""

    @abstractmethod
    def preprocess(self, item: Any, modality: str) -> torch.Tensor:
        """One raw media item (PIL image, array, path) -> the tensor `forward` takes (no batch dim)."""

    @abstractmethod
    def forward(self, pixels: torch.Tensor, modality: str) -> torch.Tensor:
        """(N, ...) preprocessed items -> (N, T, out_dim) features."""

    @property
    @abstractmethod
    def out_dim(self) -> int:
        """Width of each output feature vector."""

    def token_mask(self, items: torch.Tensor, modality: str) -> torch.Tensor | None:
        """(N, T) True at the output tokens that hold the item, False at padding the encoder emits (a tiled
        encoder's unused tiles), from the preprocessed items alone; None (the default) when every token is real."""
        return None

    # True when an item's token count depends on the item (AnyRes tiles, dynamic resolution): `describe` states the
    # most any item can take (what the budget counts), `forward` pads every item to it and `token_mask` marks the real
    # tokens (or, for items preprocessed to different shapes, which `collate` keeps as a list, `forward` takes the list
    # and returns one (T_i, out_dim) tensor per item); such features are never cached (they need the preprocessed items)
    variable_tokens: ClassVar[bool] = False

    def token_grid(self, item: torch.Tensor, modality: str) -> tuple[int, int, int] | None:
        """A preprocessed item's (t, h, w) grid of output tokens, in `forward`'s row-major order, for backbones that
        place media tokens by their grid (M-RoPE); None (the default) when the tokens have no such grid."""
        return None

    def arrange(self, tokens: torch.Tensor, items: torch.Tensor, modality: str,
                projector: torch.nn.Module) -> torch.Tensor:
        """After the projector: (N, T, H) projected tokens of the preprocessed `items` -> (N, T, H) in their final
        order (the real ones where `token_mask` says). The default keeps them; AnyRes reassembles its tiles here,
        after a per-token projector, as LLaVA-NeXT does, reading its row-end embedding off `projector`."""
        return tokens


@dataclass(frozen=True)
class ProjectorFacts:
    """What a projector emits, given its input."""

    in_dim: int
    out_dim: int
    out_tokens: int


class ProjectorConfig(ComponentConfig):
    """Settings every input projector has: widths, inferred from its neighbours when omitted."""

    in_dim: int | None = None
    out_dim: int | None = None


@dataclass
class TextContext:
    """The text around each media item, for projectors that read it (``uses_text = True``).

    One row per media item (the item's sample's text), as backbone input embeddings
    (already width ``out_dim`` of the projector) with masks:

    * ``instruction``: the prompt side of the sample (user/system turns, no media, no
      answers): InstructBLIP's instruction-aware Q-Former reads it;
    * ``target``: the answer side (tokens with labels), present only when training
      with labels: DLP's P-Former aligns the Q-Former output with it;
    * ``instruction_text``: the prompt side as text (the tokenizer's decoding, special tokens
      dropped), for projectors with a tokenizer of their own (BLIP-2-layout InstructBLIP
      Q-Former: its BERT token ids).
    """

    instruction: torch.Tensor  # (N, Li, H)
    instruction_mask: torch.Tensor  # (N, Li) bool
    target: torch.Tensor | None = None  # (N, Lt, H)
    target_mask: torch.Tensor | None = None  # (N, Lt) bool
    instruction_text: list[str] | None = None  # (N,) the prompt side decoded


class Projector(Component):
    """Encoder features (N, T, in_dim) -> LLM input embeddings (N, T', out_dim).

    A projector that reads the surrounding text sets ``uses_text = True`` and gets a
    `TextContext` as ``text``. A projector may set ``self.aux_loss`` (a scalar tensor)
    during a training forward; `MMModel` adds it to the language-model loss.
    """

    kind: ClassVar[Kind] = "projector"
    Config: ClassVar[type[ComponentConfig]] = ProjectorConfig
    modalities_in: ClassVar[tuple[str, ...]] = ("features",)
    modalities_out: ClassVar[tuple[str, ...]] = ("embeddings",)
    out_dim_doc: ClassVar[str] = "the backbone's hidden size"
    tokens_doc: ClassVar[str] = "same as its input"
    uses_text: ClassVar[bool] = False
    aux_loss: torch.Tensor | None = None  # set during a training forward by projectors with an auxiliary loss

    @classmethod
    def num_tokens(cls, config: ComponentConfig, in_tokens: int) -> int:
        """Number of output tokens for `in_tokens` input tokens (the projector's token count); by default the
        token count is unchanged (a per-token map). Projectors that pool or resample override it."""
        return in_tokens

    def grid_out(self, grid: tuple[int, int, int]) -> tuple[int, int, int] | None:
        """An item's (t, h, w) input token grid -> the grid of the tokens emitted for it, or None when they have none.
        By default a projector that keeps the token count keeps the grid; merging projectors override it."""
        t, h, w = grid
        return grid if type(self).num_tokens(self.config, t * h * w) == t * h * w else None

    @abstractmethod
    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        """(N, T, in_dim) -> (N, T', out_dim); `text` is given only to projectors with ``uses_text``."""


@dataclass(frozen=True)
class BackboneFacts:
    """What assembly needs from an LLM backbone, known without loading weights."""

    hidden_size: int
    context_length: int
    vocab_size: int
    is_encoder_decoder: bool = False
    num_layers: int = 0  # transformer blocks of the (decoder) stack, for injectors that hook every k-th layer


class Backbone(Component):
    """The language model: input embeddings -> hidden states -> logits; owns the tokenizer and generation.

    Besides the abstract methods, a backbone declares optional capabilities; `MMModel` reads only these
    declarations (their defaults are the safe "not supported"):

    * ``supports_packing``: `forward` takes a (B, 1, L, L) boolean block mask (packed rows, `mmhub.packing`);
    * ``supports_step``: `step` runs one KV-cached incremental forward (mmhub's own decode loop);
    * `only_at`: a context in which `forward` may skip work at positions whose final state nobody reads;
    * `language_model`: the wrapped transformers model (embedding tables, export), when there is one;
    * `checkpoint_blocks`: the blocks activation checkpointing wraps (``runtime.activation_checkpointing``);
    * `decoder_start_token_id`: the decoder's first input token (encoder-decoder backbones);
    * `prefix_lm`: the prompt attends bidirectionally and only the answer causally (PaliGemma); `forward` and the
      first `step` then take a (B, 1, L, L) boolean mask (`mmhub.passes.prefix_lm_mask`);
    * `grid_positions`: media tokens are placed by their (t, h, w) grid (M-RoPE); `media_position_ids` gives the
      (3, B, L) position ids `forward` and `step` take;
    * ``router_loss``: set by `forward` to a scalar tensor the training loss includes (a mixture-of-experts
      model's weighted load-balancing loss), or None; `MMModel.forward` adds it when there are labels.
    """

    kind: ClassVar[Kind] = "backbone"
    modalities_in: ClassVar[tuple[str, ...]] = ("text",)
    modalities_out: ClassVar[tuple[str, ...]] = ("text",)
    supports_packing: ClassVar[bool] = False
    supports_step: ClassVar[bool] = False
    router_loss: torch.Tensor | None = None  # set by a training forward of a mixture-of-experts backbone

    @classmethod
    @abstractmethod
    def describe(cls, config: ComponentConfig, ctx: BuildContext) -> BackboneFacts:
        """Hidden size, context length and vocabulary for these settings, without loading weights."""

    @classmethod
    @abstractmethod
    def load_tokenizer(cls, config: ComponentConfig, ctx: BuildContext) -> Any:
        """The tokenizer these settings use (a transformers tokenizer), without model weights."""

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """The tokenizer, with mmhub's placeholder tokens added."""

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width of the input embeddings."""

    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, hidden_size) input embeddings."""

    @abstractmethod
    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L, H) input embeddings -> (B, L, H) final hidden states (before the LM head)."""

    @abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) final hidden states -> (..., vocab) logits; applied only where logits are needed."""

    @abstractmethod
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Left-padded (B, L, H) prompt embeddings -> (B, new_tokens) generated ids, with a KV cache."""

    def step(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
             cache: Any = None) -> tuple[torch.Tensor, Any]:
        """One incremental forward with a KV cache: new positions' hidden states (B, L, H) and the cache to pass
        next time (created when None); `attention_mask` (B, past + L) covers cached and new positions.
        Backbones that implement it set ``supports_step = True``."""
        raise NotImplementedError(f"the {self.name} backbone has no incremental `step` (supports_step is False); "
                                  "generation goes through its `generate`")

    @property
    def prefix_lm(self) -> bool:
        """Whether the prompt (media tokens and text up to the first answer token) attends bidirectionally."""
        return False

    @property
    def grid_positions(self) -> bool:
        """Whether media tokens take their positions from their (t, h, w) grid (M-RoPE: Qwen2-VL): `forward` and
        `step` then take the position ids `media_position_ids` gives."""
        return False

    def media_position_ids(self, attention_mask: torch.Tensor,
                           spans: list[tuple[int, int, tuple[int, int, int]]]) -> torch.Tensor:
        """(B, L) attention mask of the spliced sequence and its media items as (row, first position, token grid
        (t, h, w)) -> the position ids `forward` takes (backbones with `grid_positions`)."""
        raise NotImplementedError(f"the {self.name} backbone does not place media tokens by their grid "
                                  "(grid_positions is False)")

    @contextmanager
    def only_at(self, needed: torch.Tensor) -> Iterator[bool]:
        """While active, `forward` may leave the final hidden states wrong wherever `needed` (B, L) is False.
        Yields whether it skips anything; the default skips nothing."""
        yield False

    def language_model(self) -> torch.nn.Module | None:
        """The wrapped transformers model (with ``get_input_embeddings``/``get_output_embeddings``), or None."""
        return None

    def checkpoint_blocks(self) -> list[torch.nn.Module]:
        """The transformer blocks whose activations ``runtime.activation_checkpointing`` recomputes in the backward
        pass instead of keeping (`mmhub.activation_checkpointing`); empty when the backbone offers none."""
        return []

    @property
    def decoder_start_token_id(self) -> int | None:
        """The token an encoder-decoder backbone's decoder starts from; None for decoder-only backbones."""
        return None


@dataclass
class InjectionContext:
    """What injectors see during one backbone call (set by `MMModel`, cleared afterwards).

    * ``media``: per injected modality, (B, M, T, H) projected tokens of each sample's
      items (M = most items in any sample; ``media_valid`` (B, M) marks real ones);
    * ``media_index``: (B, L) for each sequence position, the index of the latest item
      at or before it (-1 before the first), as Flamingo's masking needs;
    * ``media_positions``: (B, L) True where the sequence holds spliced media tokens
      (CogVLM's visual experts route these);
    * ``media_mask``: (B, M, T) True at the real tokens of each item, for modalities whose
      encoder marks padding tokens (`Encoder.token_mask`; Mllama's unused tiles);
    * ``token_ids``: (B, L) the text token id at each position (a spliced item's tokens carry
      its placeholder's id; -1 on padding), for injectors whose masking reads the text (IDEFICS
      stops image attention after an end-of-sequence token).
    """

    media: dict[str, torch.Tensor]
    media_valid: dict[str, torch.Tensor]
    media_index: dict[str, torch.Tensor]
    media_positions: torch.Tensor
    media_mask: dict[str, torch.Tensor] = field(default_factory=dict)
    token_ids: torch.Tensor | None = None


@dataclass(frozen=True)
class InjectorFacts:
    """How an injector uses the media: modalities it consumes as cross-attention context
    (their placeholders stay one token long instead of expanding into the projected tokens), and the
    width it takes their tokens at where that is not the backbone's hidden size (IDEFICS's cross-attention
    reads the resampler's vision-width tokens): the projector's ``out_dim`` is inferred and checked against it."""

    context_modalities: tuple[str, ...] = ()
    context_dims: dict[str, int] = field(default_factory=dict)


class InjectorConfig(ComponentConfig):
    """Settings every injector has: the backbone's width and depth, filled in by validation when omitted."""

    dim: int | None = None
    num_layers: int | None = None


class Injector(Component):
    """Changes the backbone's layers instead of (or besides) prepending media tokens.

    The hook point for Flamingo's gated cross-attention, CogVLM's visual experts and any
    plugin's own variant. `attach` registers forward hooks on backbone submodules (it must
    not replace them, so the backbone's own state dict and LoRA targets stay unchanged);
    the injector's own parameters live in the injector and are saved with it. Before each
    backbone call `MMModel` sets `context` (an `InjectionContext`) and clears it after.
    """

    kind: ClassVar[Kind] = "injector"
    Config: ClassVar[type[ComponentConfig]] = InjectorConfig

    def __init__(self, config: ComponentConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self.context: InjectionContext | None = None

    @classmethod
    @abstractmethod
    def describe(cls, config: ComponentConfig, ctx: BuildContext, backbone: BackboneFacts) -> InjectorFacts:
        """Which modalities this injector takes as context, checked against the backbone facts."""

    @abstractmethod
    def attach(self, backbone: Backbone) -> None:
        """Register hooks on the backbone's layers (called once, after both are built, before weights load)."""

    def marker(self, modality: str) -> torch.Tensor:
        """(H,) embedding of the one token that stands for an item of a context modality in the text."""
        raise NotImplementedError(f"{self.name} takes no modality as context")
