"""A small CNN that names the shape in an easy-VQA-style image (circle, rectangle or triangle).

It scores generated drawings (`mmhub.recipes.easyvqa_draw eval`): any image is converted to
RGB and area-resized to the classifier's ``size`` (32 x 32, the drawing model's own resolution),
so a 64 x 64 easy-VQA image and an upscaled 32 x 32 drawing are read the same way.

Trained here on the easy-VQA train split (labels: the shape word of each image's caption, from
`mmhub.data.easy_vqa`), with flips, 90-degree turns and mild pixel noise; scored on the test
split. The weights ship as safetensors (~100 KB) beside the drawing model:

    python -m mmhub.evaluation.shape_classifier train [--out PATH] [--epochs N]
    python -m mmhub.evaluation.shape_classifier eval [--weights PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmhub.data.easy_vqa import SHAPES

DEFAULT = Path(__file__).resolve().parent.parent / "demo_model" / "easyvqa-draw" / "shape_classifier.safetensors"


class ShapeClassifier(nn.Module):
    """Four conv blocks (16-32-64-64 channels, 3x3, batch norm) -> global average pool -> 3 shape logits."""

    def __init__(self, size: int = 32, width: int = 16):
        super().__init__()
        self.size = size
        w = width
        chans = [3, w, 2 * w, 4 * w, 4 * w]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1]),
                       nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], len(SHAPES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, size, size) pixels in [-1, 1] -> (N, 3) logits over `SHAPES`."""
        return self.head(self.features(x).mean((2, 3)))

    def preprocess(self, images: list) -> torch.Tensor:
        """PIL images (any size) -> (N, 3, size, size) pixels in [-1, 1]."""
        from PIL import Image

        arr = []
        for im in images:
            im = im.convert("RGB")
            if im.size != (self.size, self.size):
                im = im.resize((self.size, self.size), Image.BOX)
            arr.append(np.asarray(im))
        x = torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).float()
        return x.div(127.5).sub(1)

    @torch.no_grad()
    def classify(self, images: list) -> list[str]:
        """PIL images -> shape names."""
        self.eval()
        return [SHAPES[i] for i in self(self.preprocess(images)).argmax(-1).tolist()]


def load_classifier(path: str | Path = DEFAULT) -> ShapeClassifier:
    """The trained classifier from a safetensors file (its size and width are in the file's metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mmhub.errors import WeightsNotFoundError

    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"no shape classifier at {path}; train one with "
                                   f"`python -m mmhub.evaluation.shape_classifier train`")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    model = ShapeClassifier(size=int(meta.get("size", 32)), width=int(meta.get("width", 16)))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def load_images(split: str, size: int, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, size, size) pixels in [-1, 1] and (N,) shape labels of an easy-VQA split."""
    from PIL import Image

    from mmhub.data.easy_vqa import EasyVQAConfig, EasyVQADataset

    ds = EasyVQADataset(EasyVQAConfig(split=split, task="caption", limit=limit))
    pix, labels = [], []
    for i in range(len(ds)):
        s = ds[i]
        im = Image.open(s.media["image"][0]).convert("RGB")
        pix.append(np.asarray(im.resize((size, size), Image.BOX) if im.size != (size, size) else im))
        labels.append(SHAPES.index(s.messages[-1]["content"].split()[-1]))
    x = torch.from_numpy(np.stack(pix)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    return x.contiguous(), torch.tensor(labels)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    k = int(torch.randint(0, 4, (1,), generator=g))
    x = torch.rot90(x, k, (2, 3))
    noise = torch.randn(x.shape, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) * 0.15)
    return (x + noise).clamp(-1, 1)


def accuracy(model: ShapeClassifier, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch]).argmax(-1) for i in range(0, len(x), batch)])
    return float((pred == y).float().mean())


def train(out: Path = DEFAULT, epochs: int = 12, batch: int = 64, lr: float = 3e-3, size: int = 32, width: int = 16,
          seed: int = 0) -> dict:
    """Train on the train split, score on the test split, save safetensors (with the test accuracy as metadata)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    x, y = load_images("train", size)
    xt, yt = load_images("test", size)
    model = ShapeClassifier(size, width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(len(x) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(_augment(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"[shape] epoch {epoch + 1}/{epochs} loss {total / (len(x) // batch):.4f} "
              f"test acc {accuracy(model, xt, yt):.4f} ({time.time() - t0:.0f} s)", flush=True)
    result = {"train_accuracy": accuracy(model, x, y), "test_accuracy": accuracy(model, xt, yt),
              "test_images": len(xt), "epochs": epochs, "params": sum(p.numel() for p in model.parameters()),
              "seconds": round(time.time() - t0, 1)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"size": str(size), "width": str(width), "classes": ",".join(SHAPES),
                        "test_accuracy": f"{result['test_accuracy']:.4f}"})
    tmp.replace(out)
    result["file"] = str(out)
    result["bytes"] = out.stat().st_size
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmhub.evaluation.shape_classifier",
                                 description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", default=str(DEFAULT))
    t.add_argument("--epochs", type=int, default=12)
    t.add_argument("--threads", type=int, default=None)
    e = sub.add_parser("eval")
    e.add_argument("--weights", default=str(DEFAULT))
    a = ap.parse_args(argv)
    if a.cmd == "train":
        if a.threads:
            torch.set_num_threads(a.threads)
        print(json.dumps(train(Path(a.out), epochs=a.epochs), indent=1))
    else:
        model = load_classifier(a.weights)
        xt, yt = load_images("test", model.size)
        print(json.dumps({"test_accuracy": accuracy(model, xt, yt), "test_images": len(xt)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
