"""Tester classes for input-side components and backbones: `EncoderTests`, `ProjectorTests`, `BackboneTests`,
`OutputProjectorTests` (see `mmhub.testing.base.ComponentTests` for the shared checks)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mmhub.interfaces import Backbone, BuildContext, Encoder, OutputProjector, Projector
from mmhub.testing.base import Case, ComponentTests
from mmhub.testing.samples import (
    PROJ_IN,
    PROJ_OUT,
    PROJ_TOKENS,
    sample_item,
    sample_text,
)


class EncoderTests(ComponentTests):
    """An encoder on two `sample_item`s of each modality it takes: ``describe()`` must match the real output."""

    interface: ClassVar[type] = Encoder

    @classmethod
    def make_inputs(cls, case: Case) -> Any:
        assert cls.component.modalities_in, f"{cls.component.name}: modalities_in is empty"
        enc = case.module
        batches = {m: torch.stack([enc.preprocess(sample_item(m, seed=i), m) for i in range(2)])
                   for m in cls.component.modalities_in}
        case.extra["outputs"] = {m: enc(items, m) for m, items in batches.items()}
        first = cls.component.modalities_in[0]
        return batches[first], first

    @classmethod
    def call(cls, module: torch.nn.Module, inputs: Any) -> torch.Tensor:
        return module(*inputs)

    @classmethod
    def outputs(cls, case: Case) -> dict[str, torch.Tensor]:
        return case.extra["outputs"]

    def test_describe_matches_forward(self) -> None:
        case = self.case()
        name = self.component.name
        for modality, out in case.extra["outputs"].items():
            want = (2, case.facts.tokens_for(modality), case.facts.out_dim)
            # an encoder whose items take their own token count describes the most any item takes: fewer is right
            fewer = self.component.variable_tokens and out.shape[1] <= want[1] and out.shape[::2] == want[::2]
            assert out.shape == want or fewer, f"{name} ({modality}): described {want} but emitted {tuple(out.shape)}"
        assert case.module.out_dim == case.facts.out_dim, \
            f"{name}: describe() says width {case.facts.out_dim}, the instance's out_dim is {case.module.out_dim}"


class ProjectorTests(ComponentTests):
    """A projector from 16 tokens of width 24 to width 40: ``num_tokens()`` must match the real output."""

    interface: ClassVar[type] = Projector

    @classmethod
    def prepare(cls, config: Any, ctx: BuildContext) -> tuple[Any, Any]:
        config = config.model_copy(update={"in_dim": PROJ_IN, "out_dim": PROJ_OUT})
        return config, cls.component.num_tokens(config, PROJ_TOKENS)

    @classmethod
    def make_inputs(cls, case: Case) -> Any:
        x = torch.randn(2, PROJ_TOKENS, PROJ_IN, generator=torch.Generator().manual_seed(0))
        return x, sample_text(2, PROJ_OUT) if cls.component.uses_text else None

    @classmethod
    def call(cls, module: torch.nn.Module, inputs: Any) -> torch.Tensor:
        return module(*inputs)

    def test_num_tokens_matches_forward(self) -> None:
        case = self.case()
        assert case.out.shape == (2, case.facts, PROJ_OUT), \
            f"{self.component.name}: num_tokens says {case.facts}, emitted {tuple(case.out.shape)}"


class BackboneTests(ComponentTests):
    """A backbone on 8 tokens of "hello world": logits of the described vocabulary, and generation."""

    interface: ClassVar[type] = Backbone

    @classmethod
    def make_inputs(cls, case: Case) -> Any:
        ids = torch.tensor([case.module.tokenizer("hello world", add_special_tokens=False)["input_ids"][:8]])
        return {"ids": ids, "mask": torch.ones_like(ids), "seq2seq": case.facts.is_encoder_decoder}

    @classmethod
    def call(cls, module: torch.nn.Module, inputs: Any) -> torch.Tensor:
        ids, mask = inputs["ids"], inputs["mask"]
        if inputs["seq2seq"]:  # the decoder reads the same ids, teacher-forced
            return module.logits(module(module.embed(ids), mask, decoder_input_ids=ids, decoder_attention_mask=mask))
        return module.logits(module(module.embed(ids), mask))

    def test_describe_matches_forward(self) -> None:
        case = self.case()
        want = (1, case.inputs["ids"].shape[1], case.facts.vocab_size)
        assert case.out.shape == want, f"{self.component.name}: logits {tuple(case.out.shape)}, described {want}"
        assert case.module.hidden_size == case.facts.hidden_size, \
            f"{self.component.name}: hidden_size {case.module.hidden_size}, described {case.facts.hidden_size}"

    def test_generate(self) -> None:
        case = self.case()
        ids = case.inputs["ids"]
        with torch.no_grad():
            gen = case.module.generate(case.module.embed(ids), case.inputs["mask"], max_new_tokens=3, pad_token_id=0)
        assert gen.shape[0] == 1 and 1 <= gen.shape[1] <= 3, f"{self.component.name}: generated {tuple(gen.shape)}"


class OutputProjectorTests(ComponentTests):
    """An output projector from k = 3 signal states of width 24 to a 7 x 40 conditioning (unset sizes filled)."""

    interface: ClassVar[type] = OutputProjector

    @classmethod
    def prepare(cls, config: Any, ctx: BuildContext) -> tuple[Any, Any]:
        fill = (("in_dim", PROJ_IN), ("in_len", 3), ("out_len", 7), ("out_dim", PROJ_OUT))
        config = config.model_copy(update={k: v for k, v in fill if getattr(config, k) is None})
        return config, cls.component.describe(config, ctx)

    @classmethod
    def make_inputs(cls, case: Case) -> Any:
        return torch.randn(2, case.config.in_len, case.config.in_dim, generator=torch.Generator().manual_seed(0))

    @classmethod
    def call(cls, module: torch.nn.Module, inputs: Any) -> torch.Tensor:
        return module(inputs)

    def test_describe_matches_forward(self) -> None:
        case = self.case()
        facts = case.facts
        assert case.out.shape == (2, facts.out_len, facts.out_dim), \
            f"{self.component.name}: describe says {facts.out_len} x {facts.out_dim}, " \
            f"emitted {tuple(case.out.shape[1:])}"
