"""Writing mmhub models in other libraries' formats, and reading them back.

`export_hf_llava` / `import_hf_llava`: transformers' LLaVA (``LlavaForConditionalGeneration``
+ ``AutoProcessor``), lossless for LLaVA-shaped models (see `mmhub.export.hf_llava`).
"""

from mmhub.export.hf_llava import export_hf_llava
from mmhub.export.hf_llava_import import import_hf_llava

__all__ = ["export_hf_llava", "import_hf_llava"]
