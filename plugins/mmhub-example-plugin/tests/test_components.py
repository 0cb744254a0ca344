"""mmhub's shared tester classes on this plugin's components: one test per property, for each class."""

from typing import ClassVar

from mmhub_example import PatchConvEncoder, PoolLinearProjector

from mmhub.testing import EncoderTests, ProjectorTests


class TestPatchConv(EncoderTests):
    component = PatchConvEncoder
    settings: ClassVar[dict[str, int]] = {"image_size": 32, "patch_size": 8, "width": 24}


class TestPoolLinear(ProjectorTests):
    component = PoolLinearProjector
