"""Registers mmhub's built-in input and output projectors (through the same hook a third-party plugin uses)."""

from mmhub.hookspecs import hookimpl
from mmhub.projectors.c_abstractor import CAbstractorProjector
from mmhub.projectors.cif import CIFProjector
from mmhub.projectors.cross_attn_resampler import CrossAttnResamplerProjector
from mmhub.projectors.glu import GLUProjector
from mmhub.projectors.ldp import LDPProjector
from mmhub.projectors.linear import LinearProjector
from mmhub.projectors.mlp import MLPProjector
from mmhub.projectors.output import OUTPUT_PROJECTORS
from mmhub.projectors.patch_merger import PatchMergerProjector
from mmhub.projectors.perceiver import PerceiverProjector
from mmhub.projectors.pformer import PFormerProjector
from mmhub.projectors.pixel_shuffle import PixelShuffleProjector
from mmhub.projectors.qformer import QFormerProjector
from mmhub.projectors.token_merge import TokenMergeProjector
from mmhub.projectors.video_qformer import VideoQFormerProjector
from mmhub.projectors.visual_abstractor import VisualAbstractorProjector


@hookimpl
def register_projectors(register):
    register(LinearProjector)
    register(MLPProjector)
    register(QFormerProjector)
    register(PerceiverProjector)
    register(CrossAttnResamplerProjector)
    register(TokenMergeProjector)
    register(PFormerProjector)
    register(CAbstractorProjector)
    register(LDPProjector)
    register(PixelShuffleProjector)
    register(PatchMergerProjector)
    register(GLUProjector)
    register(VideoQFormerProjector)
    register(VisualAbstractorProjector)
    register(CIFProjector)


@hookimpl
def register_output_projectors(register):
    for cls in OUTPUT_PROJECTORS:
        register(cls)
