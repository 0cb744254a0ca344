"""The built-in family importers, registered through the same ``register_importers`` hook a plugin uses."""

from __future__ import annotations

from mmhub.hookspecs import hookimpl
from mmhub.importers.blip2 import Blip2Importer
from mmhub.importers.convert_cogvlm import CogVLMImporter
from mmhub.importers.convert_mplug_owl import MplugOwlImporter
from mmhub.importers.convert_qwen_vl import QwenVLImporter
from mmhub.importers.idefics import IdeficsImporter
from mmhub.importers.idefics3 import Idefics3Importer
from mmhub.importers.instructblip import InstructBlipImporter, InstructBlipVideoImporter
from mmhub.importers.llava import LlavaImporter
from mmhub.importers.llava_next import LlavaNextImporter
from mmhub.importers.llava_onevision import LlavaOnevisionImporter
from mmhub.importers.mllama import MllamaImporter
from mmhub.importers.paligemma import PaliGemmaImporter
from mmhub.importers.qwen2_vl import Qwen2VLImporter

BUILTIN = [Blip2Importer, InstructBlipImporter, InstructBlipVideoImporter, IdeficsImporter, Idefics3Importer,
           LlavaImporter, MllamaImporter,
           PaliGemmaImporter, LlavaNextImporter,
           LlavaOnevisionImporter, Qwen2VLImporter, CogVLMImporter, QwenVLImporter, MplugOwlImporter]


@hookimpl
def register_importers(register):
    for cls in BUILTIN:
        register(cls)
