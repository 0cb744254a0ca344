"""Registers mmhub's built-in input and output projectors (through the same hook a third-party plugin uses).

Each is registered by reference (``module:Class``) under its name, so discovering the plugin imports none of
the projectors' modules (torch, timm); a module loads when a spec uses it.
"""

from mmhub.hookspecs import hookimpl

PROJECTORS = (
    ("linear", "mmhub.projectors.linear:LinearProjector"),
    ("mlp", "mmhub.projectors.mlp:MLPProjector"),
    ("qformer", "mmhub.projectors.qformer:QFormerProjector"),
    ("perceiver", "mmhub.projectors.perceiver:PerceiverProjector"),
    ("cross_attn_resampler", "mmhub.projectors.cross_attn_resampler:CrossAttnResamplerProjector"),
    ("token_merge", "mmhub.projectors.token_merge:TokenMergeProjector"),
    ("pformer", "mmhub.projectors.pformer:PFormerProjector"),
    ("c_abstractor", "mmhub.projectors.c_abstractor:CAbstractorProjector"),
    ("ldp", "mmhub.projectors.ldp:LDPProjector"),
    ("pixel_shuffle", "mmhub.projectors.pixel_shuffle:PixelShuffleProjector"),
    ("patch_merger", "mmhub.projectors.patch_merger:PatchMergerProjector"),
    ("glu", "mmhub.projectors.glu:GLUProjector"),
    ("video_qformer", "mmhub.projectors.video_qformer:VideoQFormerProjector"),
    ("visual_abstractor", "mmhub.projectors.visual_abstractor:VisualAbstractorProjector"),
    ("cif", "mmhub.projectors.cif:CIFProjector"),
)
OUTPUT_PROJECTORS = (
    ("output_mlp", "mmhub.projectors.output:OutputMLPProjector"),
    ("output_transformer", "mmhub.projectors.output:OutputTransformerProjector"),
    ("output_qformer", "mmhub.projectors.output:OutputQFormerProjector"),
)


@hookimpl
def register_projectors(register):
    for name, ref in PROJECTORS:
        register(ref, name=name)


@hookimpl
def register_output_projectors(register):
    for name, ref in OUTPUT_PROJECTORS:
        register(ref, name=name)
