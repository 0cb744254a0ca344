"""mmhub: assemble, train and demo multimodal LLMs from declarative specs, with components as plugins.

Public API::

    import mmhub
    model = mmhub.build("llava-1.5:tiny")          # a spec file, preset, dict or Spec
    model.generate(["<image>\\nWhat is shown?"], [{"image": [img]}])
    model.save_pretrained("out/")
    model = mmhub.MMModel.from_pretrained("out/")
"""

from mmhub.assembly import build
from mmhub.errors import MMHubError, SpecError
from mmhub.hookspecs import hookimpl
from mmhub.model import MMModel
from mmhub.registry import get_registry
from mmhub.spec import Spec, load_spec
from mmhub.validation import plan_spec

__version__ = "0.1.0"
__all__ = ["build", "MMModel", "Spec", "load_spec", "plan_spec", "get_registry", "hookimpl", "MMHubError", "SpecError"]
