"""A small training run used by the trainer tests as a subprocess (killed, resumed, or run under torchrun).

usage: python train_script.py OUT_DIR BATCH_SIZE [GRAD_ACCUM] [--resume] [--shard] [--no-cache]
Builds a tiny spec with two stages (projector alignment, then projector + LoRA) over an in-memory
colour dataset that is the same in every process, and trains it with mmhub's trainer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmhub.data import Sample  # noqa: E402
from mmhub.train.run import train  # noqa: E402

from conftest import TINY_LLAMA  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}


def dataset(n: int = 64) -> list[Sample]:
    out = []
    for i in range(n):
        name = list(COLOURS)[i % 4]
        img = Image.new("RGB", (32, 32), COLOURS[name])
        img.putpixel((i % 32, (3 * i) % 32), (i * 7 % 255, 0, 0))  # every image distinct
        out.append(Sample(str(i), [{"role": "user", "content": "<image>\nWhat colour is it?"},
                                   {"role": "assistant", "content": f"It is {name}."}], {"image": [img]}))
    return out


# transformers' default weight scale: with TINY_LLAMA's 0.5 the logits are so large that training turns rounding
# differences (summation order, the CPU's vector width) into ~1e-2 weight differences within a few steps, and
# runs that should agree (two processes, gradient accumulation) differ by chance, not because of a bug
BACKBONE = {**TINY_LLAMA, "initializer_range": 0.02}


def spec(batch_size: int, grad_accum: int = 1, shard: bool = False, cache: bool = True) -> dict:
    stage = {"batch_size": batch_size, "grad_accum": grad_accum, "lr": 5e-3, "save_every": 2, "log_every": 1,
             "warmup_ratio": 0.2, "keep_last": 10, "cache_features": cache}
    return {"name": "trainer-test", "seed": 3,
            "encoders": {"image": {"type": "open_clip", "arch": None, "embed_dim": 32,
                                   "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 32,
                                                  "head_width": 16}}},
            "projectors": {"image": {"type": "mlp", "depth": 2}},
            "backbone": {"type": "hf_causal_lm", "config": BACKBONE, "tokenizer": "byte"}, "template": "chatml",
            "stages": [{"name": "align", "train": {"projectors": "full"}, "max_steps": 6, **stage,
                        **({"placement": {"projectors.image": "shard"}} if shard else {})},
                       {"name": "tune", "train": {"projectors": "full", "backbone": {"lora": {"r": 4}}}, "max_steps": 4,
                        **stage, **({"placement": {"backbone": "shard"}} if shard else {})}]}


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, bs = sys.argv[1], int(sys.argv[2])
    accum = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3].isdigit() else 1
    data = dataset()
    if "--resume" in sys.argv:
        train(resume=out, datasets={"align": data, "tune": data}, progress_bar=False)
    else:
        train(spec(bs, accum, "--shard" in sys.argv, "--no-cache" not in sys.argv), out=out,
              datasets={"align": data, "tune": data}, progress_bar=False)
