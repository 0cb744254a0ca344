"""The built-in family importers, registered through the same ``register_importers`` hook a plugin uses.

Each is registered by reference (``module:Class``) under its name, in the order importers are tried; an
importer's module (and the transformers code it reads) loads when it is used.
"""

from __future__ import annotations

from mmhub.hookspecs import hookimpl

BUILTIN = (
    ("blip_2", "mmhub.importers.blip2:Blip2Importer"),
    ("instructblip", "mmhub.importers.instructblip:InstructBlipImporter"),
    ("instructblipvideo", "mmhub.importers.instructblip:InstructBlipVideoImporter"),
    ("idefics", "mmhub.importers.idefics:IdeficsImporter"),
    ("idefics3", "mmhub.importers.idefics3:Idefics3Importer"),
    ("llava", "mmhub.importers.llava:LlavaImporter"),
    ("mllama", "mmhub.importers.mllama:MllamaImporter"),
    ("paligemma", "mmhub.importers.paligemma:PaliGemmaImporter"),
    ("llava_next", "mmhub.importers.llava_next:LlavaNextImporter"),
    ("llava_onevision", "mmhub.importers.llava_onevision:LlavaOnevisionImporter"),
    ("qwen2_vl", "mmhub.importers.qwen2_vl:Qwen2VLImporter"),
    ("cogvlm", "mmhub.importers.convert_cogvlm:CogVLMImporter"),
    ("qwen_vl", "mmhub.importers.convert_qwen_vl:QwenVLImporter"),
    ("mplug_owl", "mmhub.importers.convert_mplug_owl:MplugOwlImporter"),
)


@hookimpl
def register_importers(register):
    for name, ref in BUILTIN:
        register(ref, name=name)
