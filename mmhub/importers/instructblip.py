"""The InstructBLIP family importer: transformers ``instructblip`` folders -> hf_vision -> instruction-aware qformer
(layout blip2) -> Vicuna/LLaMA/OPT or Flan-T5.

`InstructBlipVideoImporter` takes transformers' ``instructblipvideo`` folders: a ``video`` encoder (4 frames through
the same tower, ``temporal: concat``) and the Q-Former with ``frames: 4`` (each frame read on its own with the
instruction, their query tokens concatenated), template ``blip-2-video``.

As BLIP-2 (`mmhub.importers.blip2`), except the Q-Former reads the instruction: the prompt text
(`TextContext.instruction_text`, the prompt side of each sample decoded) is tokenized by the folder's own
Q-Former tokenizer (``qformer_tokenizer/``, BERT) and enters through the Q-Former's word/position embeddings,
with the separate text FFN per block, as transformers' ``InstructBlipQFormerModel`` computes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from mmhub.errors import CheckpointError
from mmhub.importers.base import Checkpoint, Imported, Importer, ImportOptions
from mmhub.importers.blip2 import blip_parts

QFORMER_TOKENIZER = "qformer_tokenizer"  # where InstructBlipProcessor.save_pretrained writes the Q-Former's tokenizer
FRAMES = 4  # InstructBLIP-Video's processor and model read every clip as 4 frames


class InstructBlipImporter(Importer):
    """InstructBLIP (Salesforce/instructblip-vicuna-*, instructblip-flan-t5-*)."""

    name: ClassVar[str] = "instructblip"
    model_types: ClassVar[tuple[str, ...]] = ("instructblip",)
    description: ClassVar[str] = ("InstructBLIP: ViT tower -> instruction-aware qformer (layout blip2, its own BERT "
                                  "tokenizer) + language projection -> Vicuna / Flan-T5")

    frames: ClassVar[int | None] = None  # video: the frames each clip is read as

    def convert(self, ckpt: Checkpoint, options: ImportOptions) -> Imported:
        tokenizer = ckpt.folder / QFORMER_TOKENIZER
        if not (tokenizer / "tokenizer_config.json").is_file():
            raise CheckpointError(f"{ckpt.folder}: no {QFORMER_TOKENIZER}/ (the Q-Former's own tokenizer, which "
                                  f"InstructBlipProcessor.save_pretrained writes); the instruction cannot be encoded "
                                  f"without it: save the processor into the folder")
        q = ckpt.hf_config().qformer_config
        extra = {"instruction_aware": True, "text_tokenizer": str(tokenizer), "text_vocab_size": q.vocab_size,
                 "text_positions": q.max_position_embeddings, "text_pad_id": q.pad_token_id or 0}
        spec, weights = blip_parts(ckpt, options, extra, self.frames)
        return Imported(spec=spec, weights=weights)

    def export(self, model: Any, out: Path) -> Path:
        from mmhub.importers.blip2_export import export_blip

        return export_blip(model, out, self.name)


class InstructBlipVideoImporter(InstructBlipImporter):
    """InstructBLIP-Video (transformers ``instructblipvideo``): 4 frames per clip, each through the tower and the
    instruction-aware Q-Former, their query tokens concatenated in time order (4 x num_query_tokens)."""

    name: ClassVar[str] = "instructblipvideo"
    model_types: ClassVar[tuple[str, ...]] = ("instructblipvideo",)
    description: ClassVar[str] = ("InstructBLIP-Video: 4 frames -> ViT tower -> instruction-aware qformer per frame "
                                  "(layout blip2) -> concatenated -> Vicuna / Flan-T5")
    frames: ClassVar[int | None] = FRAMES
