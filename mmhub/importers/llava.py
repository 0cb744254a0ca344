"""The LLaVA family importer: transformers ``llava`` folders -> hf_vision -> mlp/linear -> hf_causal_lm.

The conversion itself (tower settings and preprocessing, projector recognition, chat template) lives in
`mmhub.export.hf_llava_import`, beside the exporter it mirrors; this module plugs it into the importer framework
with the tower built from the folder's vision config and all weights taken from the checkpoint, so an imported model
saved with ``save_pretrained`` holds every weight itself. Export writes the LLaVA folder back
(`mmhub.export.hf_llava.export_hf_llava`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from mmhub.importers.base import Checkpoint, Imported, Importer, ImportOptions


def _load_language(state: dict[str, Any], where: str) -> Any:
    """After the build: the LLM's base model and (untied) head from the checkpoint, loaded strictly."""
    from mmhub.importers.run import load_strict

    def load(model: Any) -> None:
        lm = model.backbone.language_model()
        load_strict(lm.base_model, state["language"], f"{where} -> language model")
        if state["head"]:
            load_strict(lm.get_output_embeddings(), state["head"], f"{where} -> lm_head")
    return load


class LlavaImporter(Importer):
    """LLaVA / LLaVA-1.5 (CLIP or SigLIP tower, 2-layer MLP or linear projector, any causal LM)."""

    name: ClassVar[str] = "llava"
    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    description: ClassVar[str] = "LLaVA: CLIP/SigLIP tower at vision_feature_layer -> mlp/linear -> causal LM"

    def convert(self, ckpt: Checkpoint, options: ImportOptions) -> Imported:
        from mmhub.export.hf_llava_import import llava_spec

        spec, state = llava_spec(ckpt.folder, options.template, options.dtype, ckpt=ckpt, inline_tower=True)
        weights = {"encoders.image.model": state["tower"], "projectors.image": state["projector"]}
        return Imported(spec=spec, weights=weights, after_load=_load_language(state, str(ckpt.folder)))

    def export(self, model: Any, out: Path) -> Path:
        from mmhub.export.hf_llava import export_hf_llava

        return export_hf_llava(model, out)
