"""``mmhub import`` and ``mmhub export``: published checkpoints in, other libraries' folders (and GGUF files) out.

``mmhub import SOURCE OUT`` takes a local transformers folder or ``hf:ORG/NAME[@REV]`` from the local Hugging Face
cache (never downloaded), picks the family importer from its ``config.json`` (``mmhub.importers``) and writes an
mmhub model folder. ``mmhub export MODEL OUT --format hf`` writes the family's own transformers folder back for an
imported model whose family can export; ``--format hf-llava`` writes any LLaVA-shaped mmhub model as transformers'
LLaVA.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EXPORT_FORMATS = ("hf", "hf-llava", "mmhub", "gguf")
IMPORT_FORMATS = ("auto", "hf-llava")
DTYPE_CHOICES = ["float32", "bfloat16", "float16"]


def _source_folder(source: str) -> Path:
    """A folder argument, or an ``hf:`` id resolved in the local cache (the ``hf:`` source explains a miss)."""
    if source.startswith("hf:"):
        from mmhub import weights

        return weights.resolve(source)
    return Path(source).expanduser()


def cmd_import(args: argparse.Namespace) -> int:
    from mmhub.cli import preset_components, preset_summary
    from mmhub.errors import CheckpointError
    from mmhub.importers import Checkpoint, import_checkpoint

    folder = _source_folder(args.folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a transformers model folder (no config.json); give a folder written "
                              f"by save_pretrained or hf:ORG/NAME from the local Hugging Face cache")
    if args.format == "hf-llava" and Checkpoint(folder).model_type != "llava":
        raise CheckpointError(f"{folder} holds a {Checkpoint(folder).model_type!r} model, not a transformers LLaVA "
                              f"(model_type llava); drop --format to pick the importer from config.json")
    model = import_checkpoint(folder, template=args.template, dtype=args.dtype,
                              trust_remote_code=args.trust_remote_code)
    model.save_pretrained(args.out)
    summary = preset_summary(preset_components(model.plan.resolved_dict()))
    info: dict[str, Any] = model.imported_from
    print(f"wrote {args.out}: mmhub model {model.spec.name!r} from the {info['importer']} importer ({summary}; "
          f"template {model.plan.template.name})")
    for note in model.import_notes:
        print(f"  note: {note}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mmhub.errors import ExportError
    from mmhub.importers import importers
    from mmhub.loading import load

    if args.format != "mmhub" and (args.dtype == "int8" or args.lora_rank is not None):
        raise ExportError(f"--dtype int8 and --lora-rank apply to --format mmhub only, not {args.format!r}; "
                          "other formats merge the adapters into the weights they write")
    model = load(args.model, trust_remote_code=args.trust_remote_code, allow_paths=args.allow_path)
    if args.format == "gguf":
        from mmhub.export.gguf import cli_export_gguf

        return cli_export_gguf(model, args.out, args.type, args.pre_tokenizer)
    if args.format == "mmhub":
        return _export_mmhub(model, args)
    if args.format == "hf-llava":
        from mmhub.export import export_hf_llava

        out = export_hf_llava(model, args.out, dtype=args.dtype)
    else:
        family = (getattr(model, "imported_from", None) or {}).get("importer") or "llava"
        importer = importers()[family]() if family in importers() else None
        if importer is None or not importer.can_export():
            able = sorted(n for n, c in importers().items() if c.can_export())
            raise ExportError(f"cannot export {args.model!r} as a transformers folder: its family {family!r} has no "
                              f"exporter (families that export: {', '.join(able)})")
        out = importer.export(model, Path(args.out))
    cfg = json.loads((Path(out) / "config.json").read_text())
    print(f"wrote {out}: transformers {cfg.get('model_type')} folder ({', '.join(cfg.get('architectures') or [])}), "
          f"dtype {cfg.get('dtype') or cfg.get('torch_dtype')}")
    return 0


def _export_mmhub(model: Any, args: argparse.Namespace) -> int:
    """The same model as an mmhub folder, smaller: float32 tensors stored as --dtype, LoRA truncated to --lora-rank."""
    storage = None if args.dtype in (None, "float32") else args.dtype
    if args.lora_rank is not None:
        from mmhub.adapter_rank import reduce_adapter_rank

        for r in reduce_adapter_rank(model, args.lora_rank):
            print(f"{r.slot}: LoRA rank {r.rank_before} -> {r.rank_after} on {r.layers} layers "
                  f"({r.params_before:,} -> {r.params_after:,} parameters); update energy kept: mean "
                  f"{r.energy_mean:.1%}, worst layer {r.energy_min:.1%}")
        if model.spec.init_from:  # the base folder's adapters have the old rank: this folder must stand alone
            print(f"saved self-contained (not on top of {model.spec.init_from}, whose adapters have the old rank)")
            model.spec.init_from = None
    model.save_pretrained(args.out, storage_dtype=storage)
    size = (Path(args.out) / "model.safetensors").stat().st_size
    print(f"wrote {args.out}: mmhub model folder, tensors stored as {storage or 'saved'} ({size / 1e6:.1f} MB)")
    return 0


def add_parsers(sub: Any, trust_flag: Any) -> None:
    """The ``export`` and ``import`` subcommands."""
    s = sub.add_parser("export", help="write a model as a transformers folder (hf: the imported family's own; "
                                      "hf-llava: transformers' LLaVA), as llama.cpp's GGUF + mmproj pair (gguf) "
                                      "or again as an mmhub folder (mmhub: with --dtype float16/bfloat16/int8, its "
                                      "float32 tensors stored at half or a quarter of the size, and --lora-rank)")
    s.add_argument("model", help="a saved model folder, a spec file, a preset, or `default` (the demo model)")
    trust_flag(s, folders=True)
    s.add_argument("out", help="the folder to write (replaced atomically)")
    s.add_argument("--format", default="hf", choices=EXPORT_FORMATS)
    s.add_argument("--dtype", choices=DTYPE_CHOICES + ["int8"], default=None,
                   help="cast every tensor to this dtype (hf-llava; needed when components differ in dtype); "
                        "mmhub: the storage dtype of the float32 tensors (int8: one scale per row)")
    s.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="mmhub: truncate the LoRA adapters to rank R (SVD of each update; prints the energy kept)")
    s.add_argument("--type", choices=["f32", "f16", "q8_0"], default=None,
                   help="gguf: the language model's tensor type (default f16; the mmproj is f32 for f32, else f16)")
    s.add_argument("--pre-tokenizer", default=None,
                   help="gguf: llama.cpp's pre-tokenizer name (default: the backbone's GGUF source's, else default)")
    s.set_defaults(func=cmd_export)
    s = sub.add_parser("import", help="turn a published transformers checkpoint into an mmhub model folder "
                                      "(the family is read from config.json; `mmhub plugins` lists the importers)")
    s.add_argument("folder", help="a local transformers folder, or hf:ORG/NAME[@REV] from the local HF cache")
    s.add_argument("out", help="the mmhub model folder to write")
    s.add_argument("--format", default="auto", choices=IMPORT_FORMATS,
                   help="auto: the importer registered for config.json's model_type; hf-llava: require a LLaVA")
    s.add_argument("--template", default=None, help="the mmhub chat template when the folder's is not recognised "
                                                    "(plain, vicuna_v1, llama-2, chatml, tokenizer)")
    s.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                   help="the backbone's dtype (vision towers and projectors run in float32)")
    trust_flag(s)
    s.set_defaults(func=cmd_import)
