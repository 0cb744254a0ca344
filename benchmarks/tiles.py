"""How cost grows with AnyRes tiles: mmhub against transformers' LLaVA-NeXT, 2 -> 5 tiles per image.

    python -m benchmarks.tiles [--rounds 2] [--out benchmarks/results/tiles.json]

transformers writes a LLaVA-NeXT folder (CLIP tower 192-wide, 4 layers, 224-pixel tiles of 49 patches; MLP; Llama
256-wide, 4 layers; random weights; its own processor with the pinpoints below) and mmhub imports it
(`mmhub.importers.import_checkpoint`: anyres(hf_vision) -> mlp + image_newline -> Llama, the same weights). Each
point's image has the aspect ratio whose best pinpoint is a grid of 1, 2, 3 or 4 tiles, so with AnyRes' base tile
an image is 2, 3, 4 or 5 tiles. For every point each side runs alone in a child process (one warm-up, then
``--rounds`` timed repetitions; the median and the child's peak RSS):

* ``train``: a training step on 2 conversations (one image each, ~60 text tokens), the projector and the LLM
  trained with AdamW, the tower frozen and run every step on both sides;
* ``prefill``: the same prompts' first forward pass without gradients (time to first token).

The JSON holds per point both sides' seconds and peak RSS, the ratios (mmhub throughput over the peer's, mmhub's
peak RSS over the peer's) and each side's growth slope (log seconds against log tiles).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TILE = 224
PINPOINTS = [[TILE, TILE], [TILE, 2 * TILE], [TILE, 3 * TILE], [2 * TILE, 2 * TILE]]
# (height, width) of a picture whose best pinpoint is each grid: 1, 2, 3 and 4 tiles, + the base tile
POINTS = {2: (TILE, TILE), 3: (TILE, 2 * TILE), 4: (TILE, 3 * TILE), 5: (2 * TILE, 2 * TILE)}
CLIP = {"model_type": "clip_vision_model", "hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 4,
        "num_attention_heads": 4, "image_size": TILE, "patch_size": 32}
LLAMA = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 4096,
         "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
QUESTION = "Describe the picture in a few words, please: what is in it, and where?"
ANSWER = "A pattern of coloured noise over the whole picture."


def write_folder(folder: Path) -> Path:
    """The LLaVA-NeXT folder, written by transformers (config, weights, processor with a vicuna chat template)."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    from mmhub.backbones.byte_tokenizer import byte_tokenizer
    from mmhub.export.chat_template import jinja_template
    from mmhub.templates import resolve_template

    tok = byte_tokenizer()
    tok.add_special_tokens({"extra_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    tok.chat_template = jinja_template(resolve_template("vicuna_v1", tok), tok, "<image>")
    config = LlavaNextConfig(vision_config=CLIP, text_config=LLAMA, image_token_index=tok.convert_tokens_to_ids(
        "<image>"), image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2, projector_hidden_act="gelu",
        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).save_pretrained(str(folder))
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                              image_grid_pinpoints=PINPOINTS)
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=CLIP["patch_size"],
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=tok.chat_template).save_pretrained(str(folder))
    return folder


def pictures(tiles: int, n: int = 2) -> list[Any]:
    from PIL import Image

    rng = np.random.default_rng(tiles)
    h, w = POINTS[tiles]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def conversations(n: int = 2) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"<image>\n{QUESTION}"}, {"role": "assistant", "content": ANSWER}]] * n


def child(side: str, folder: Path, tiles: int, kind: str, rounds: int, threads: int) -> None:
    """One side alone on one point: a warm-up, then `rounds` timed repetitions; prints JSON."""
    import time

    from benchmarks.common import peak_rss_mib
    from benchmarks.llava_steps import optimizer

    torch.set_num_threads(threads)
    convs, pics = conversations(), pictures(tiles)
    if side == "mmhub":
        from mmhub.importers import import_checkpoint

        model = import_checkpoint(folder)
        tokens = int(model.encoders["image"].token_mask(model.encoders["image"].preprocess(pics[0], "image")[None],
                                                        "image").sum())
        batch = model.batch(convs, [{"image": [p]} for p in pics])
        if kind == "train":
            model.requires_grad_(False)
            model.projectors.requires_grad_(True)
            model.backbone.requires_grad_(True)
            model.train()
            opt = optimizer([p for p in model.parameters() if p.requires_grad])

            def work() -> None:
                opt.zero_grad(set_to_none=True)
                model(**batch, return_logits=False).loss.backward()
                opt.step()
        else:
            model.eval()
            prompts = model.batch([c[:1] for c in convs], [{"image": [p]} for p in pics], add_generation_prompt=True)

            def work() -> None:
                with torch.no_grad():
                    model(**{k: v for k, v in prompts.items() if k != "labels"})
    else:
        import transformers

        hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32)
        processor = transformers.AutoProcessor.from_pretrained(str(folder))
        processor.tokenizer.padding_side = "right"
        texts = [processor.apply_chat_template(c if kind == "train" else c[:1], tokenize=False,
                                               add_generation_prompt=kind != "train") for c in convs]
        inputs = dict(processor(images=pics, text=texts, padding=True, return_tensors="pt"))
        tokens = int((inputs["input_ids"][0] == hf.config.image_token_index).sum())
        if kind == "train":
            labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
            labels = labels.masked_fill(labels == hf.config.image_token_index, -100)
            for name, p in hf.named_parameters():
                p.requires_grad_("vision_tower" not in name)
            hf.train()
            opt = optimizer([p for p in hf.parameters() if p.requires_grad])

            def work() -> None:
                opt.zero_grad(set_to_none=True)
                hf(**inputs, labels=labels).loss.backward()
                opt.step()
        else:
            hf.eval()

            def work() -> None:
                with torch.no_grad():
                    hf(**inputs)
    work()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        work()
        times.append(time.perf_counter() - t)
    print(json.dumps({"seconds": float(np.median(times)), "all_seconds": times, "peak_rss_mib": peak_rss_mib(),
                      "image_tokens": tokens}))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.common import environment
    from benchmarks.scaling import _slope

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mmhub-tiles-"))
    workdir.mkdir(parents=True, exist_ok=True)
    write_folder(workdir / "llava-next")
    result: dict[str, Any] = {"environment": environment(torch.float32), "rounds": args.rounds,
                              "threads": args.threads, "model": {"clip": CLIP, "llama": LLAMA, "tile": TILE,
                                                                 "pinpoints": PINPOINTS}, "kinds": {}}
    flip = False
    for kind in ("train", "prefill"):
        points = []
        for tiles in POINTS:
            row: dict[str, Any] = {"tiles": tiles, "picture_hw": POINTS[tiles]}
            for side in (["transformers", "mmhub"] if flip else ["mmhub", "transformers"]):
                cmd = [sys.executable, "-m", "benchmarks.tiles", "--child", side, "--workdir", str(workdir),
                       "--tiles", str(tiles), "--kind", kind, "--rounds", str(args.rounds),
                       "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode != 0:
                    row[side] = {"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr else "failed"}
                    continue
                row[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            flip = not flip
            if all("seconds" in row.get(s, {}) for s in ("mmhub", "transformers")):
                row["throughput_ratio"] = round(row["transformers"]["seconds"] / row["mmhub"]["seconds"], 3)
                row["memory_ratio"] = round(row["mmhub"]["peak_rss_mib"] / row["transformers"]["peak_rss_mib"], 3)
            points.append(row)
            print(kind, json.dumps(row), flush=True)
        growth = {side: _slope([p["tiles"] for p in points], [p.get(side, {}).get("seconds") for p in points])
                  for side in ("mmhub", "transformers")}
        result["kinds"][kind] = {"points": points, "growth_slope": growth}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tiles", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="benchmarks/results/tiles.json")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--child", choices=["mmhub", "transformers"], default=None)
    ap.add_argument("--tiles", type=int, default=2)
    ap.add_argument("--kind", choices=["train", "prefill"], default="train")
    a = ap.parse_args(argv)
    if a.child:
        child(a.child, Path(a.workdir) / "llava-next", a.tiles, a.kind, a.rounds, a.threads)
        return 0
    from mmhub.atomic import write_text_atomic

    write_text_atomic(Path(a.out), json.dumps(run(a), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
