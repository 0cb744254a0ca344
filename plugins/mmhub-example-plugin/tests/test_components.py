"""mmhub's shared tester classes on this plugin's components: one test per property, for each class."""

from mmhub.testing import EncoderTests, ProjectorTests
from mmhub_example import PatchConvEncoder, PoolLinearProjector


class TestPatchConv(EncoderTests):
    component = PatchConvEncoder
    settings = {"image_size": 32, "patch_size": 8, "width": 24}


class TestPoolLinear(ProjectorTests):
    component = PoolLinearProjector
