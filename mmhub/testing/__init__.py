"""Tester classes for components, datasets and evaluation tasks, for mmhub's own tests and plugin authors'.

Subclass the class of the component's kind in a ``Test*`` class and pytest runs every shared check::

    from mmhub.testing import EncoderTests

    class TestPatchConv(EncoderTests):
        component = PatchConvEncoder      # the class under test
        settings = {"width": 32}          # optional; default: the class's example_settings

Components are checked for docstrings, their settings schema, ``describe()`` against a real forward,
finite outputs and gradients, an exact safetensors save/reload round trip, and dtype/device moves.
"""

from mmhub.testing.base import ComponentTests
from mmhub.testing.components import (
    BackboneTests,
    EncoderTests,
    OutputProjectorTests,
    ProjectorTests,
)
from mmhub.testing.data import DatasetTests, EvalTaskTests
from mmhub.testing.generators import GeneratorTests
from mmhub.testing.injectors import InjectorTests
from mmhub.testing.samples import CAPTIONS, sample_item, sample_text, torch_threads

TESTS_BY_KIND: dict[str, type[ComponentTests]] = {
    "encoder": EncoderTests, "projector": ProjectorTests, "backbone": BackboneTests, "injector": InjectorTests,
    "output_projector": OutputProjectorTests, "generator": GeneratorTests,
}

__all__ = [
    "CAPTIONS",
    "TESTS_BY_KIND",
    "BackboneTests",
    "ComponentTests",
    "DatasetTests",
    "EncoderTests",
    "EvalTaskTests",
    "GeneratorTests",
    "InjectorTests",
    "OutputProjectorTests",
    "ProjectorTests",
    "sample_item",
    "sample_text",
    "torch_threads",
]
