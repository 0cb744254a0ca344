"""`mmhub serve`'s engine on a CUDA GPU: every greedy answer equals `MMModel.generate` alone, in both modes.

    python benchmarks/cuda_serve_check.py        # needs a CUDA GPU; run from the repository root

Ten requests (one random image each, 5..33 new tokens) go to an engine of 4 rows on the GPU: a tiny LLaVA-shaped
model (continuous batching) and `flamingo:tiny` (gated cross-attention injectors: served one at a time). Prints,
per model, how many answers equal the same request run alone with `generate` (text and token ids); exits 1 if any
differs.
"""

from __future__ import annotations

import copy
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from mmhub import build  # noqa: E402
from mmhub.loading import load  # noqa: E402
from mmhub.serve.engine import Engine, Failed, Finished, Request, Sampling  # noqa: E402

from conftest import TINY_SPEC  # noqa: E402


def serve_all(model: Any, prompts: list, limits: list[int], max_batch: int) -> tuple[list[Any], Engine]:
    engine = Engine(model, max_batch=max_batch).start()
    results: dict[int, Any] = {}
    done = threading.Event()

    def sink(i: int) -> Any:
        def emit(ev: Any) -> None:
            if isinstance(ev, (Finished, Failed)):
                results[i] = ev
                if len(results) == len(prompts):
                    done.set()
        return emit

    for i, ((messages, media), k) in enumerate(zip(prompts, limits, strict=True)):
        engine.submit(Request(messages, media, Sampling(max_tokens=k, temperature=0), sink(i)))
        time.sleep(0.002)  # arrivals spread over the decode steps
    if not done.wait(300):
        raise SystemExit("the engine did not finish in 300 s")
    engine.stop()
    return [results[i] for i in range(len(prompts))], engine


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU here", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(4)]
    failed = 0
    for model in (build(copy.deepcopy(TINY_SPEC)), load("flamingo:tiny")):
        model = model.to("cuda").eval()
        ph = model.processor.placeholders["image"]
        prompts = [([{"role": "user", "content": f"{ph}\nq{i} " + "x" * (3 * i)}], {"image": [images[i % 4]]})
                   for i in range(10)]
        limits = [5 + (7 * i) % 30 for i in range(10)]
        alone = [model.generate([m], [media], max_new_tokens=k)[0]
                 for (m, media), k in zip(prompts, limits, strict=True)]
        got, engine = serve_all(model, prompts, limits, 4)
        same = [isinstance(g, Finished) and g.text == a.text and g.token_ids == a.token_ids
                for g, a in zip(got, alone, strict=True)]
        failed += len(same) - sum(same)
        print(f"{model.spec.name}: {engine.mode} batching ({engine.mode_reason or 'rows share the batch'}), "
              f"{sum(same)} of {len(same)} answers equal to generate alone, {engine.stats.steps} decode steps, "
              f"on {model.device}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
