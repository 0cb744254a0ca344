"""Q-Former input projector: a fixed set of learned queries that read the encoder features.

BLIP-2's Querying Transformer: ``num_queries`` learned query tokens go through ``layers``
transformer blocks; every block lets the queries attend to each other, every
``cross_attention_every``-th block (BLIP-2's ``cross_attention_freq=2``) also lets them
cross-attend to the encoder features, and a linear maps them to the LLM width. The LLM
sees exactly ``num_queries`` tokens whatever the encoder emits.

With ``instruction_aware: true`` it is InstructBLIP's instruction-aware Q-Former: the
instruction's tokens join the queries in self-attention (queries read the instruction,
the instruction never reads the image directly) and only the query positions are output.

Used by BLIP-2, InstructBLIP, MiniGPT-4, X-LLM (C-Former), VideoChat, Video-LLaMA, BuboGPT,
X-InstructBLIP and MiniGPT-5; mPLUG-Owl's visual abstractor has the same shape (a Q-Former
with ``cross_attention_every: 1``).

Differences from the BERT-initialised originals, all deliberate: blocks are pre-LN (a final
LayerNorm closes the stack) instead of BERT's post-LN; the instruction arrives as LLM input
embeddings (width ``out_dim``, what `TextContext` carries) rather than BERT token ids, so it
is mapped to the Q-Former width by a linear layer plus parameter-free sinusoidal positions
(counted over the real tokens only, so left or right padding gives the same positions) and
a LayerNorm; and query and text positions share one FFN per block (InstructBLIP keeps a
separate text FFN from its BERT initialisation).

``layout: blip2`` is instead the layout of the published BLIP-2 / InstructBLIP checkpoints
(`mmhub.projectors.qformer_blip2`): post-LN BERT blocks, the queries' embedding LayerNorm,
no ``ln_features`` (transformers' vision tower ends in that norm), and, instruction-aware, the
instruction as the Q-Former's own BERT token ids (``text_tokenizer`` tokenizes the prompt text
that `TextContext.instruction_text` carries) through BERT word/position embeddings and a
separate text FFN per block. transformers' ``Blip2QFormerModel`` / ``InstructBlipQFormerModel``
weights load into it (`qformer_state`) and give the same outputs; ``proj`` is BLIP-2's
``language_projection``.

``pretrain_heads: true`` (layout blip2) adds BLIP-2's first-stage side, which stages with
``objective: blip2_qformer`` train: the Q-Former's BERT text embeddings and text FFNs, the ITC
projections, the ITM head and the tied ITG LM head (`mmhub.projectors.qformer_pretrain`).

Video (the input: a video encoder's ``temporal: concat`` output, ``frames`` frames' tokens in time order):
``read_frames: each`` (the default) reads every frame on its own and concatenates the frames' query outputs
(InstructBLIP-Video, X-InstructBLIP: ``frames x num_queries`` tokens, ordered for the LLM by its own positions);
``read_frames: together`` reads all frames' tokens at once (VideoChat: ``num_queries`` tokens), which by itself
cannot tell a clip from its reverse, since cross-attention does not see the order of its keys.
``frame_positions: N`` adds learned frame-position embeddings (`mmhub.projectors.frame_positions`, an N-row
table, Video-LLaMA's ``video_frame_position_embedding``): to each frame's query outputs when frames are read on
their own (where Video-LLaMA adds them), to each frame's (normalised) feature tokens when they are read together
(as Flamingo adds its learned time embeddings to the frame features before its resampler).

The building blocks (`QFormerBlock`, `QueryTransformer`, `TextIn`) are reused by the
P-Former of `mmhub.projectors.pformer`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from mmhub.attention import MultiheadAttention
from mmhub.interfaces import BuildContext, ComponentConfig, Projector, ProjectorConfig, TextContext
from mmhub.projectors.frame_positions import FramePositions
from mmhub.projectors.qformer_blip2 import BertQFormer, tokenize_instructions
from mmhub.projectors.qformer_pretrain import (
    QFormerPretrainHeads,
    TextBatch,
    image_embeddings,
    pretrain_losses,
    text_embeddings,
)


def sinusoid(positions: torch.Tensor, width: int) -> torch.Tensor:
    """(N, L) integer positions -> (N, L, width) sin/cos encodings (the Transformer paper's, zero-padded if odd)."""
    half = width // 2
    steps = torch.arange(half, device=positions.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000.0) * steps / max(half, 1))
    angles = positions.to(torch.float32)[..., None] * freqs  # (N, L, half)
    enc = torch.cat([angles.sin(), angles.cos()], -1)
    if width % 2:
        enc = nn.functional.pad(enc, (0, 1))
    return enc


class TextIn(nn.Module):
    """LLM-space text (N, L, text_dim) -> (N, L, width): linear, sinusoidal positions of real tokens, LayerNorm."""

    def __init__(self, text_dim: int, width: int):
        super().__init__()
        self.proj = nn.Linear(text_dim, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)  # padding-side independent
        h = self.proj(text)
        return self.norm(h + sinusoid(positions, h.shape[-1]).to(h.dtype))


class QFormerBlock(nn.Module):
    """One pre-LN Q-Former layer: self-attention over [queries; text], cross-attention of the queries to the features
    (only when built with ``cross_dim``), then an FFN."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, backend: str, cross_dim: int | None = None):
        super().__init__()
        self.ln_self = nn.LayerNorm(width)
        self.self_attn = MultiheadAttention(width, heads, backend=backend)
        self.ln_cross = nn.LayerNorm(width) if cross_dim else None
        self.cross_attn = MultiheadAttention(width, heads, kv_dim=cross_dim, backend=backend) if cross_dim else None
        hidden = max(1, round(width * mlp_ratio))
        self.ln_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    @property
    def has_cross_attention(self) -> bool:
        return self.cross_attn is not None

    def forward(self, h: torch.Tensor, n_queries: int, mask: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> torch.Tensor:
        """h: (N, Q + L, width), queries first; mask: (N, Q + L) True = real token; features: (N, T, cross_dim)."""
        h = h + self.self_attn(self.ln_self(h), mask=mask)
        if self.cross_attn is not None and self.ln_cross is not None:
            if features is None:
                raise ValueError("this Q-Former block cross-attends to encoder features, but none were given")
            queries = h[:, :n_queries]
            queries = queries + self.cross_attn(self.ln_cross(queries), features)
            h = torch.cat([queries, h[:, n_queries:]], 1)
        return h + self.ffn(self.ln_ffn(h))


class QueryTransformer(nn.Module):
    """Learned queries through a stack of `QFormerBlock`s; optional text tokens join the self-attention.

    Returns the (final-LayerNorm'd) query positions only: (N, num_queries, width). Block ``i``
    cross-attends to the features when ``feature_dim`` is set and ``i % cross_every == 0``
    (BLIP-2's rule: layers 0, k, 2k, ...). With ``text_dim`` set, `forward` takes text
    embeddings of that width (BLIP-2-style text tokens, here LLM embeddings).
    """

    def __init__(self, num_queries: int, width: int, layers: int, heads: int, mlp_ratio: float, backend: str,
                 feature_dim: int | None = None, cross_every: int = 1, text_dim: int | None = None):
        super().__init__()
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.empty(num_queries, width))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.blocks = nn.ModuleList(
            QFormerBlock(width, heads, mlp_ratio, backend, cross_dim=feature_dim if i % cross_every == 0 else None)
            for i in range(layers))
        self.text_in = TextIn(text_dim, width) if text_dim else None
        self.ln_out = nn.LayerNorm(width)

    def forward(self, features: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        ref = features if features is not None else text
        if ref is None:
            raise ValueError("a QueryTransformer needs features, text or both")
        N, Q = ref.shape[0], self.num_queries
        h = self.queries.to(ref.dtype).expand(N, -1, -1)
        mask = None
        if text is not None and self.text_in is not None:
            if text_mask is None:
                text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
            h = torch.cat([h, self.text_in(text, text_mask.to(torch.bool))], 1)
            mask = torch.cat([torch.ones(N, Q, dtype=torch.bool, device=h.device), text_mask.to(torch.bool)], 1)
        for block in self.blocks:
            h = block(h, Q, mask, features)
        return self.ln_out(h[:, :Q])


def repeat_text(text: TextContext | None, times: int) -> TextContext | None:
    """`text` with every item's row repeated `times` times in place (one copy per frame of the item)."""
    if text is None:
        return None

    def rep(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.repeat_interleave(times, 0) if t is not None else None

    texts = [t for t in text.instruction_text for _ in range(times)] if text.instruction_text is not None else None
    return TextContext(text.instruction.repeat_interleave(times, 0), text.instruction_mask.repeat_interleave(times, 0),
                       rep(text.target), rep(text.target_mask), texts)


class QFormerConfig(ProjectorConfig):
    """Settings of `QFormerProjector`; defaults are BLIP-2's (32 queries, 12 layers, width 768, cross-attn every 2nd)"""

    num_queries: int = Field(32, ge=1)
    layers: int = Field(12, ge=1)
    width: int = Field(768, ge=1)
    heads: int = Field(12, ge=1)
    cross_attention_every: int = Field(2, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    instruction_aware: bool = False
    layout: Literal["pre_ln", "blip2"] = Field(
        "pre_ln", description="pre_ln: mmhub's own; blip2: the published BLIP-2/InstructBLIP layout (post-LN BERT)")
    norm_eps: float | None = Field(None, gt=0, description="LayerNorm epsilon (default 1e-5 pre_ln, 1e-12 blip2)")
    text_tokenizer: str | None = Field(
        None, description="blip2 + instruction_aware: the Q-Former's own (BERT) tokenizer folder or weight source")
    text_vocab_size: int = Field(30523, ge=1, description="blip2 + instruction_aware: BERT word embeddings")
    text_positions: int = Field(512, ge=1, description="blip2 + instruction_aware: BERT position embeddings")
    text_pad_id: int = Field(0, ge=0, description="blip2 + instruction_aware: the tokenizer's padding id")
    frames: int = Field(1, ge=1, description="the input holds this many frames' tokens in time order; each frame is "
                        "read on its own, outputs concatenated (InstructBLIP-Video): frames x num_queries tokens")
    read_frames: Literal["each", "together"] = Field(
        "each", description="frames > 1: each: every frame through the Q-Former on its own (frames x num_queries "
        "tokens); together: all frames' tokens at once (num_queries tokens; order-blind without frame_positions)")
    frame_positions: int | None = Field(
        None, ge=1, description="rows of a learned frame-position table (the most frames; Video-LLaMA: 32), added "
        "to each frame's query outputs (read_frames: each) or feature tokens (together); needs frames > 1")
    pretrain_heads: bool = Field(
        False, description="blip2: BLIP-2's first-stage side (the Q-Former's text embeddings and text FFNs, ITC "
                           "projections, ITM head, ITG LM head, temperature) for a stage with objective: blip2_qformer")
    embed_dim: int = Field(256, ge=1, description="pretrain_heads: the ITC embedding width (BLIP-2: 256)")
    max_text_len: int = Field(32, ge=2, description="pretrain_heads: captions are cut to this many Q-Former tokens")
    text_cls_token: str = Field("[CLS]", description="pretrain_heads: the first token of a caption (its ITC embedding)")
    text_dec_token: str = Field("[DEC]", description="pretrain_heads: ITG's first token; added to the tokenizer "
                                "when missing, as LAVIS adds [DEC] to BERT's")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "QFormerConfig":
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}; fix: pick heads that divide "
                             f"the width (e.g. heads: {math.gcd(self.width, self.heads)})")
        if self.layout == "blip2" and self.instruction_aware and self.text_tokenizer is None:
            raise ValueError("layout blip2 with instruction_aware: true reads the instruction as the Q-Former's own "
                             "token ids; fix: set text_tokenizer to its (BERT) tokenizer folder")
        if self.pretrain_heads and (self.layout != "blip2" or self.text_tokenizer is None):
            raise ValueError("pretrain_heads (BLIP-2's first stage) needs layout: blip2 (the Q-Former with BERT text "
                             "embeddings) and text_tokenizer (its tokenizer folder or weight source, or byte); "
                             f"got layout {self.layout}, text_tokenizer {self.text_tokenizer}")
        if self.pretrain_heads and self.frames != 1:
            raise ValueError(f"pretrain_heads trains on images (frames: 1), got frames: {self.frames}")
        if self.layout == "blip2" and self.text_pad_id >= self.text_vocab_size:
            raise ValueError(f"text_pad_id {self.text_pad_id} is outside text_vocab_size {self.text_vocab_size}")
        if self.frame_positions is not None and self.frames == 1:
            raise ValueError(f"frame_positions {self.frame_positions} needs the frame count: set frames to the video "
                             "encoder's num_frames (temporal: concat), or drop frame_positions for images")
        if self.frame_positions is not None and self.frames > self.frame_positions:
            raise ValueError(f"frames {self.frames} exceeds the {self.frame_positions}-row frame-position table; fix: "
                             f"set frame_positions >= {self.frames}")
        return self


class QFormerProjector(Projector):
    """Learned queries that cross-attend to the features (BLIP-2 Q-Former); optionally instruction-aware (InstructBLIP).

    ``uses_text``: the *class* says True (a Q-Former can read the instruction, so class-level
    checks such as the shared component test hand it a `TextContext`); each *instance* sets
    ``self.uses_text`` to its ``instruction_aware`` setting, so a model that asks the
    instance builds the text context only when it is read. An instance with
    ``instruction_aware: false`` ignores ``text`` entirely.
    """

    name: ClassVar[str] = "qformer"
    Config: ClassVar[type[ComponentConfig]] = QFormerConfig
    tokens_doc: ClassVar[str] = "num_queries (32 by default) x frames (1 by default), whatever the input token count"
    example_settings: ClassVar[dict[str, Any]] = {"num_queries": 4, "layers": 2, "width": 16, "heads": 2,
                                                  "cross_attention_every": 2, "instruction_aware": True}
    uses_text: ClassVar[bool] = True

    @classmethod
    def num_tokens(cls, config: QFormerConfig, in_tokens: int) -> int:
        if in_tokens < 1:
            raise ValueError(f"{cls.name} needs at least 1 input token to attend to, got {in_tokens}; "
                             "fix: check the encoder's token count")
        if in_tokens % config.frames:
            raise ValueError(f"{cls.name} reads {config.frames} frames, but {in_tokens} input tokens are not "
                             f"{config.frames} equal frames; fix: set frames to the video encoder's num_frames "
                             "(with temporal: concat)")
        return config.num_queries if config.read_frames == "together" else config.frames * config.num_queries

    def __init__(self, config: QFormerConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        assert config.in_dim is not None and config.out_dim is not None, "in_dim/out_dim are filled in by validation"
        self.uses_text = config.instruction_aware  # type: ignore[misc]  # per instance, see the class docstring
        if config.layout == "blip2":
            self._build_blip2(config, ctx)
            self.proj = nn.Linear(config.width, config.out_dim)  # transformers' language_projection
            self._add_frame_positions(config)
            return
        self.ln_features = nn.LayerNorm(config.in_dim)  # BLIP-2's ln_vision
        self.qformer = QueryTransformer(config.num_queries, config.width, config.layers, config.heads, config.mlp_ratio,
                                        ctx.attention, feature_dim=config.in_dim,
                                        cross_every=config.cross_attention_every,
                                        text_dim=config.out_dim if config.instruction_aware else None)
        self.proj = nn.Linear(config.width, config.out_dim)  # BLIP-2's llm_proj
        if config.norm_eps is not None:
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.eps = config.norm_eps
        self._add_frame_positions(config)

    def _add_frame_positions(self, config: QFormerConfig) -> None:
        """The frame-position table (`mmhub.projectors.frame_positions`), as wide as what it is added to."""
        if config.frame_positions is None:
            self.frame_position = None
            return
        assert config.in_dim is not None, "in_dim is filled in by validation"
        width = config.in_dim if config.read_frames == "together" else config.width
        self.frame_position = FramePositions(config.frame_positions, width)

    def _timed(self, features: torch.Tensor) -> torch.Tensor:
        """Reading frames together: (N, T, D) features with each frame's row of the table added to its tokens."""
        config: QFormerConfig = self.config  # type: ignore[assignment]
        if self.frame_position is None or config.read_frames != "together":
            return features
        n, t, d = features.shape
        return self.frame_position.add(features.reshape(n, config.frames, t // config.frames, d)).reshape(n, t, d)

    def _build_blip2(self, config: QFormerConfig, ctx: BuildContext) -> None:
        """The published layout (`mmhub.projectors.qformer_blip2`), and the Q-Former tokenizer when it reads text."""
        from transformers import AutoTokenizer

        hidden = max(1, round(config.width * config.mlp_ratio))
        reads_text = config.instruction_aware or config.pretrain_heads
        self.qformer = BertQFormer(config.num_queries, config.width, config.layers, config.heads, hidden,
                                   config.norm_eps or 1e-12, ctx.attention, feature_dim=config.in_dim,
                                   cross_every=config.cross_attention_every,
                                   text_vocab=config.text_vocab_size if reads_text else None,
                                   text_positions=config.text_positions, text_pad_id=config.text_pad_id)
        self.text_tokenizer = None
        if reads_text and config.text_tokenizer == "byte":  # test-size models: no tokenizer files
            from mmhub.backbones.byte_tokenizer import byte_tokenizer

            self.text_tokenizer = byte_tokenizer()
        elif reads_text and config.text_tokenizer is not None:
            folder = ctx.weights(config.text_tokenizer)
            self.text_tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                                trust_remote_code=False)
        if config.pretrain_heads:
            self.pretrain = QFormerPretrainHeads(config.width, config.embed_dim, config.text_vocab_size,
                                                 config.norm_eps or 1e-12)
            if self.text_tokenizer is not None and config.text_dec_token not in self.text_tokenizer.get_vocab():
                self.text_tokenizer.add_special_tokens({"bos_token": config.text_dec_token})
        if self.text_tokenizer is not None:
            if len(self.text_tokenizer) > config.text_vocab_size:
                raise ValueError(f"text_tokenizer {config.text_tokenizer} has {len(self.text_tokenizer)} tokens but "
                                 f"text_vocab_size is {config.text_vocab_size}; fix: set text_vocab_size to the "
                                 "Q-Former's word-embedding rows")

    def query_states(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        """(N, T, in_dim) features (+ the instruction when instruction-aware) -> (N, num_queries, width)."""
        config: QFormerConfig = self.config  # type: ignore[assignment]
        if config.layout == "blip2":
            return self._blip2_states(features, text)
        instruction = mask = None
        if config.instruction_aware:
            if text is None:
                raise ValueError(f"{self.name} has instruction_aware: true, so it reads the instruction, but no text "
                                 "context was given; fix: pass `text` (MMModel does this for projectors whose "
                                 "uses_text is True) or set instruction_aware: false")
            instruction, mask = text.instruction, text.instruction_mask
            if instruction.shape[-1] != config.out_dim or instruction.shape[0] != features.shape[0]:
                raise ValueError(f"{self.name}: instruction embeddings {tuple(instruction.shape)} do not match "
                                 f"{features.shape[0]} items of LLM width {config.out_dim}")
        return self.qformer(self._timed(self.ln_features(features)), instruction, mask)

    def _blip2_states(self, features: torch.Tensor, text: TextContext | None) -> torch.Tensor:
        config: QFormerConfig = self.config  # type: ignore[assignment]
        features = self._timed(features)
        if not config.instruction_aware:
            return self.qformer(features)
        texts = text.instruction_text if text is not None else None
        if texts is None or self.text_tokenizer is None:
            raise ValueError(f"{self.name} (layout blip2, instruction_aware) reads the instruction as text "
                             "(TextContext.instruction_text), but none was given; fix: run it inside an MMModel "
                             "(which fills it) or pass a TextContext with instruction_text")
        if len(texts) != features.shape[0]:
            raise ValueError(f"{self.name}: {len(texts)} instruction texts for {features.shape[0]} items; "
                             "give one per item")
        ids, mask = tokenize_instructions(self.text_tokenizer, list(texts), config.text_positions, features.device)
        return self.qformer(features, ids, mask)

    # -- BLIP-2's first stage (pretrain_heads; `mmhub.projectors.qformer_pretrain`) ----------------
    def caption_ids(self, texts: list[str], device: torch.device) -> TextBatch:
        """Captions -> the Q-Former's own ids: [CLS] tokens [SEP] (the tokenizer's sep, else eos), cut to
        max_text_len, right-padded with text_pad_id; plus ITG's [DEC] id."""
        config: QFormerConfig = self.config  # type: ignore[assignment]
        tok = self.text_tokenizer
        if not config.pretrain_heads or tok is None:
            raise ValueError(f"{self.name}: captions need the first-stage text side; set pretrain_heads: true "
                             "(layout: blip2, text_tokenizer: ...)")
        vocab = tok.get_vocab()
        if config.text_cls_token not in vocab:
            raise ValueError(f"text_cls_token {config.text_cls_token!r} is not in the Q-Former tokenizer "
                             f"({config.text_tokenizer}); set text_cls_token to its first-token marker")
        end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        if end is None:
            raise ValueError(f"the Q-Former tokenizer ({config.text_tokenizer}) has neither a sep nor an eos token "
                             "to end a caption with")
        body = tok(list(texts), add_special_tokens=False)["input_ids"]
        rows = [[vocab[config.text_cls_token], *b[:config.max_text_len - 2], end] for b in body]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), config.text_pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = True
        return TextBatch(ids.to(device), mask.to(device), vocab[config.text_dec_token])

    def pretrain_losses(self, features: torch.Tensor, captions: list[str],
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """BLIP-2's first-stage losses {"itc", "itm", "itg"} of N (image features (N, T, in_dim), caption) pairs."""
        return pretrain_losses(self.qformer, self.pretrain, features, self.caption_ids(captions, features.device),
                               generator)

    def similarity(self, features: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """ITC's image-text similarity (images, captions): the max over queries of the normalised embeddings' dot
        products (before the temperature), BLIP-2's retrieval score."""
        image = image_embeddings(self.qformer, self.pretrain, features)
        text = text_embeddings(self.qformer, self.pretrain, self.caption_ids(captions, features.device))
        return torch.einsum("iqd,td->itq", image, text).amax(-1)

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        config: QFormerConfig = self.config  # type: ignore[assignment]
        frames = config.frames
        N, T, D = features.shape
        if T % frames:
            raise ValueError(f"{self.name}: {T} feature tokens are not {frames} equal frames; fix: set frames to the "
                             "video encoder's num_frames (with temporal: concat)")
        if frames == 1 or config.read_frames == "together":
            return self.proj(self.query_states(features, text))  # (N, T, in) -> (N, num_queries, out)
        states = self.query_states(features.reshape(N * frames, T // frames, D), repeat_text(text, frames))
        states = states.reshape(N, frames, states.shape[1], -1)  # (N, F, Q, width)
        if self.frame_position is not None:
            states = self.frame_position.add(states)  # Video-LLaMA's placement: on each frame's query outputs
        return self.proj(states.reshape(N, -1, states.shape[-1]))  # frame after frame, each frame's queries
