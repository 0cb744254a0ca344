"""Registers mmhub's built-in generators (through the same hook a third-party plugin uses).

Each is registered by reference (``module:Class``) under its name; a module loads when a spec uses it.
"""

from mmhub.hookspecs import hookimpl

GENERATORS = (
    ("stable_diffusion", "mmhub.generators.stable_diffusion:StableDiffusionGenerator"),
    ("text_to_video", "mmhub.generators.text_to_video:TextToVideoGenerator"),
    ("audioldm", "mmhub.generators.audioldm:AudioLDMGenerator"),
    ("pixel_diffusion", "mmhub.generators.pixel_diffusion:PixelDiffusionGenerator"),
)


@hookimpl
def register_generators(register):
    for name, ref in GENERATORS:
        register(ref, name=name)
