"""Registers mmhub's built-in generators (through the same hook a third-party plugin uses)."""

from mmhub.hookspecs import hookimpl


@hookimpl
def register_generators(register):
    from mmhub.generators.audioldm import AudioLDMGenerator
    from mmhub.generators.pixel_diffusion import PixelDiffusionGenerator
    from mmhub.generators.stable_diffusion import StableDiffusionGenerator
    from mmhub.generators.text_to_video import TextToVideoGenerator

    register(StableDiffusionGenerator)
    register(TextToVideoGenerator)
    register(AudioLDMGenerator)
    register(PixelDiffusionGenerator)
