"""Importers: published transformers checkpoints taken apart into mmhub components, with their weights.

`import_checkpoint(folder)` picks the family importer registered for the folder's ``model_type`` (hook
``register_importers``), builds the mmhub spec it returns and loads the weights strictly. How to write an importer
for a new family: docs/importers.md.
"""

from mmhub.importers.base import Checkpoint, Imported, Importer, ImportOptions
from mmhub.importers.run import (
    UnsupportedModelError,
    find_importer,
    import_checkpoint,
    importers,
    load_strict,
    supported_model_types,
)

__all__ = ["Checkpoint", "Imported", "Importer", "ImportOptions", "import_checkpoint", "find_importer", "importers",
           "supported_model_types", "load_strict", "UnsupportedModelError"]
