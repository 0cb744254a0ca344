"""`GeneratorTests`: a generator's text features match its described conditioning, and generation returns
one item of the declared modality and size per row, the same for the same seed."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from mmhub.interfaces import Generator
from mmhub.testing.base import Case, ComponentTests
from mmhub.testing.samples import CAPTIONS, declared_size, media_array


class GeneratorTests(ComponentTests):
    """A generator on two captions: ``encode_text`` gives the described conditioning; ``generate`` (2 steps) on it
    returns one item per caption. Runs with one torch thread (tiny diffusion models are per-op bound)."""

    interface: ClassVar[type] = Generator
    num_threads: ClassVar[int | None] = 1
    needs_gradients: ClassVar[bool] = False  # generators' own text encoders may run without autograd

    @classmethod
    def make_inputs(cls, case: Case) -> Any:
        return list(CAPTIONS)

    @classmethod
    def call(cls, module: torch.nn.Module, inputs: Any) -> torch.Tensor:
        return module.encode_text(inputs)

    def test_describe_matches_forward(self) -> None:
        case = self.case()
        name, facts = self.component.name, case.facts
        assert facts.modality in self.component.modalities_out, \
            f"{name}: describes {facts.modality} but declares modalities_out {self.component.modalities_out}"
        want = (len(CAPTIONS), facts.cond_len, facts.cond_dim)
        assert tuple(case.out.shape) == want, f"{name}: described conditioning {want}, encode_text gave " \
                                              f"{tuple(case.out.shape)}"

    def test_generate(self) -> None:
        case = self.case()
        name, modality, gen = self.component.name, case.facts.modality, case.module
        cond = case.out.detach()
        with torch.no_grad():
            items = gen.generate(cond, seed=0, steps=2)
            assert len(items) == len(CAPTIONS), f"{name}: {len(CAPTIONS)} conditionings gave {len(items)} items"
            arrays = [media_array(item, modality) for item in items]
            size = declared_size(gen)
            if modality in ("image", "video") and size is not None:
                got = {(a.shape[-2], a.shape[-3]) for a in arrays}
                assert got == {size}, f"{name}: declared (width, height) {size} but generated {sorted(got)}"
            again = [media_array(item, modality) for item in gen.generate(cond, seed=0, steps=2)]
        assert all(np.array_equal(a, b) for a, b in zip(arrays, again, strict=True)), \
            f"{name}: the same seed gave different output"

