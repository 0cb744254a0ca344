"""ImageBind's published checkpoint (``imagebind_huge.pth``, facebookresearch/ImageBind) -> the ``imagebind``
encoder's weights and settings.

The checkpoint's keys are ImageBind's module tree, ``modality_preprocessors.<m>.*``, ``modality_trunks.<m>.*``,
``modality_heads.<m>.*`` and ``modality_postprocessors.<m>.*`` for m in vision, text, audio, depth, thermal, imu;
the ``imagebind`` encoder (`mmhub.encoders.imagebind`) holds the same names, so converting is choosing the trunks,
reading every size the tensors tell (each trunk's width and block count, the joint width, the patch kernels, the
image size, the IMU window and length), checking that every tensor of the chosen trunks has its place with its
shape, and setting the rest aside by name (the text tower: no MM-LLM here reads it). The head counts are not in the
tensors: imagebind_huge's are the default.

    python -m mmhub.importers.convert_imagebind imagebind_huge.pth ~/models/imagebind_huge_mmhub.safetensors

writes the safetensors file the presets read (``pretrained: file:~/models/imagebind_huge_mmhub.safetensors``) and
prints the encoder settings. The .pth is read with ``torch.load(weights_only=True)``: tensors only, never code.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmhub.encoders.imagebind import TRUNKS, ImageBindConfig, ImageBindEncoder, split_official
from mmhub.encoders.imagebind_parts import IMU_CHANNELS
from mmhub.errors import WeightsNotFoundError
from mmhub.interfaces import BuildContext

HUGE_HEADS = {"vision": 16, "audio": 12, "depth": 8, "thermal": 12, "imu": 8}  # imagebind_huge's
PRE = "modality_preprocessors"


def _need(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise WeightsNotFoundError(f"ImageBind state dict: no {key}; it is not an ImageBind checkpoint, or this "
                                   f"trunk is not in it (drop it from trunks)")
    return state[key]


def read_settings(state: Mapping[str, torch.Tensor], trunks: Sequence[str],
                  num_heads: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The ``imagebind`` settings the tensors of `trunks` tell (head counts from `num_heads`, else imagebind_huge's)."""
    heads = {**HUGE_HEADS, **(num_heads or {})}
    out: dict[str, Any] = {"trunks": list(trunks)}
    for m in trunks:
        if m not in TRUNKS:
            raise WeightsNotFoundError(f"{m!r} is not an ImageBind trunk; choose from {', '.join(TRUNKS)}")
        if not any(k.startswith(f"modality_trunks.{m}.") for k in state):
            raise WeightsNotFoundError(f"ImageBind state dict: no modality_trunks.{m}.* tensors; drop {m!r} from "
                                       f"trunks (it holds: {', '.join(sorted(_trunks_in(state)))})")
        width = _need(state, f"{PRE}.{m}.cls_token").shape[-1]
        blocks = {int(g.group(1)) for k in state if (g := re.match(rf"modality_trunks\.{m}\.blocks\.(\d+)\.", k))}
        out[m] = {"embed_dim": int(width), "num_blocks": len(blocks), "num_heads": int(heads[m])}
        proj = f"modality_heads.{m}.{3 if m == 'imu' else 2}.weight"
        out["out_embed_dim"] = int(_need(state, proj).shape[0])
    if "vision" in trunks:
        kernel = _need(state, f"{PRE}.vision.rgbt_stem.proj.1.weight").shape[-1]
        grid = math.isqrt(_need(state, f"{PRE}.vision.pos_embedding_helper.pos_embed").shape[1] - 1)
        out |= {"patch_size": int(kernel), "image_size": int(grid * kernel)}
    if "audio" in trunks:
        out["audio_kernel"] = int(_need(state, f"{PRE}.audio.rgbt_stem.proj.weight").shape[-1])
    for m, stem in (("depth", "depth_stem"), ("thermal", "rgbt_stem")):
        if m in trunks:
            out[f"{m}_kernel"] = int(_need(state, f"{PRE}.{m}.{stem}.proj.weight").shape[-1])
    if "imu" in trunks:
        kernel = _need(state, f"{PRE}.imu.imu_stem.proj.weight").shape[1] // IMU_CHANNELS
        out |= {"imu_kernel": int(kernel), "imu_length": int((_need(state, f"{PRE}.imu.pos_embed").shape[1] - 1)
                                                             * kernel)}
    return out


def _trunks_in(state: Mapping[str, torch.Tensor]) -> set[str]:
    return {k.split(".")[1] for k in state if k.startswith("modality_trunks.")}


def convert_imagebind(state: Mapping[str, torch.Tensor], trunks: Sequence[str] | None = None,
                      num_heads: Mapping[str, int] | None = None, settings: Mapping[str, Any] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """An ImageBind state dict -> (the ``imagebind`` encoder's state dict, its settings, the keys set aside).

    `trunks`: the trunks to keep (default: vision and audio, those the MM-LLMs read); `settings`: what the tensors
    cannot tell (``mel_bins``, ``target_length``, ``audio_stride``: ImageBind's 128, 204, 10 by default) or an
    override. Every tensor of the kept trunks must have its place with its shape, and every place its tensor."""
    trunks = list(trunks or ("vision", "audio"))
    found = read_settings(state, trunks, num_heads) | dict(settings or {})
    config = ImageBindConfig.model_validate(found)
    with torch.device("meta"):  # shapes only: no memory for a huge model
        own = ImageBindEncoder(config, BuildContext(resolve=str)).state_dict()
    kept, dropped = split_official(dict(state), config.trunks)
    missing = sorted(set(own) - set(kept))
    unexpected = sorted(set(kept) - set(own))
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in kept.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise WeightsNotFoundError(
            f"ImageBind state dict does not fit the imagebind encoder with {json.dumps(found)}: "
            f"{len(missing)} missing ({', '.join(missing[:4])}), {len(unexpected)} unexpected "
            f"({', '.join(unexpected[:4])}), {len(wrong)} of another shape ({'; '.join(wrong[:3])}); check the "
            f"settings the tensors cannot tell (num_heads, mel_bins, target_length, audio_stride)")
    return kept, found, dropped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ImageBind checkpoint -> imagebind encoder safetensors")
    parser.add_argument("src", help="imagebind_huge.pth (a plain state dict) or a .safetensors copy")
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("--trunks", default="vision,audio", help="trunks to keep, comma-separated (%(default)s)")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    from mmhub.weights import read_state_dict

    state, settings, dropped = convert_imagebind(read_state_dict(Path(args.src).expanduser()),
                                                 trunks=args.trunks.split(","))
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    print(f"wrote {out}: {len(state)} tensors; set aside {len(dropped)} (trunks not kept, the text tower)")
    print("encoder settings: " + json.dumps({"type": "imagebind", **settings}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
