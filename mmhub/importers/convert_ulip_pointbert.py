"""A ULIP / ULIP-2 checkpoint (salesforce/ULIP; X-InstructBLIP's 3D encoder) -> the ``point_bert`` encoder's weights
and settings.

ULIP's checkpoints hold the whole ULIP model under ``state_dict`` with DDP's ``module.`` prefix: the Point-BERT point
encoder as ``point_encoder.*`` (``encoder.first_conv`` / ``second_conv``, ``reduce_dim``, ``cls_token``, ``cls_pos``,
``pos_embed``, ``blocks.blocks.<i>``, ``norm``), plus the parts of ULIP the encoder does not hold (``pc_projection``,
``logit_scale``, the image and text towers). Converting strips the prefixes, reads the sizes the tensors tell (input
channels, ``encoder_dims``, ``trans_dim``, ``depth``), checks that every Point-BERT tensor has its place with its
shape, and sets the rest aside by name. The head count is not in the tensors (ULIP's Point-BERT: 6); the grouping
(``num_group``, ``group_size``, ``num_points``) has no tensors and stays a setting.

    python -m mmhub.importers.convert_ulip_pointbert ULIP-2_pointbert.pt ~/models/ulip2_pointbert_mmhub.safetensors

reads the file with ``torch.load(weights_only=True)`` (tensors only, never code) and writes the safetensors file the
x-instructblip preset reads.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmhub.encoders.point_bert import PointBertConfig, PointBertEncoder
from mmhub.errors import WeightsNotFoundError
from mmhub.interfaces import BuildContext

PREFIXES = ("module.point_encoder.", "point_encoder.")


def convert_ulip_pointbert(state: Mapping[str, torch.Tensor], num_heads: int = 6,
                           settings: Mapping[str, Any] | None = None
                           ) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """A ULIP state dict -> (the ``point_bert`` state dict, the settings the tensors tell, the keys set aside)."""
    kept: dict[str, torch.Tensor] = {}
    set_aside: list[str] = []
    for key, value in state.items():
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        if prefix is None:
            set_aside.append(key)
        else:
            kept[key[len(prefix):]] = value
    if "cls_token" not in kept or "encoder.first_conv.0.weight" not in kept:
        raise WeightsNotFoundError(f"ULIP state dict: no point_encoder.cls_token / encoder.first_conv tensors among "
                                   f"{len(state)} keys; it is not a ULIP Point-BERT checkpoint")
    depth = len({m.group(1) for k in kept if (m := re.match(r"blocks\.blocks\.(\d+)\.", k))})
    found = {"in_channels": int(kept["encoder.first_conv.0.weight"].shape[1]),
             "encoder_dims": int(kept["reduce_dim.weight"].shape[1]) if "reduce_dim.weight" in kept else 256,
             "trans_dim": int(kept["cls_token"].shape[-1]), "depth": depth, "num_heads": int(num_heads)}
    found |= dict(settings or {})
    config = PointBertConfig.model_validate({"num_points": 1, "num_group": 1, "group_size": 1, **found})
    with torch.device("meta"):  # shapes only
        own = PointBertEncoder(config, BuildContext(resolve=str)).state_dict()
    missing, unexpected = sorted(set(own) - set(kept)), sorted(set(kept) - set(own))
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in kept.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise WeightsNotFoundError(
            f"ULIP Point-BERT tensors do not fit the point_bert encoder with {json.dumps(found)}: {len(missing)} "
            f"missing ({', '.join(missing[:4])}), {len(unexpected)} unexpected ({', '.join(unexpected[:4])}), "
            f"{len(wrong)} of another shape ({'; '.join(wrong[:3])})")
    return kept, found, set_aside


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ULIP / ULIP-2 checkpoint -> point_bert encoder safetensors")
    parser.add_argument("src", help="a ULIP checkpoint (.pt with state_dict, or .safetensors)")
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("--num-heads", type=int, default=6, help="attention heads (ULIP's Point-BERT: 6)")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    from mmhub.weights import read_state_dict

    state, settings, set_aside = convert_ulip_pointbert(read_state_dict(Path(args.src).expanduser()),
                                                        num_heads=args.num_heads)
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    print(f"wrote {out}: {len(state)} tensors; set aside {len(set_aside)} (ULIP's projection and other towers)")
    print("encoder settings: " + json.dumps({"type": "point_bert", **settings}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
