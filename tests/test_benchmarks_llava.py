"""Smoke test of `benchmarks.llava`: the tiny configuration end to end (1 round, no warm-up, short sequences);
checks the report's structure and that every number is finite and positive. No timing thresholds."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is a top-level folder, not installed
from benchmarks.llava import main  # noqa: E402

RATIO_KEYS = ["stage1_samples_per_s", "stage2_samples_per_s", "generate_tokens_per_s_b1", "generate_tokens_per_s_b8",
              "ttft_b1", "peak_memory"]


def positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_llava_benchmark_tiny(tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    main(["--size", "tiny", "--rounds", "1", "--warmup", "0", "--min-len", "16", "--max-len", "48", "--prompt-len", "8",
          "--new-tokens", "8", "--pack-len", "128", "--out", str(out), "--chart", str(png)])
    rep = json.loads(out.read_text())
    assert png.stat().st_size > 0
    for key in ("cpu", "cores", "torch", "transformers", "torch_threads", "dtype"):
        assert rep["environment"][key], key
    assert set(RATIO_KEYS) <= set(rep["ratios"])
    for key in RATIO_KEYS:
        assert positive(rep["ratios"][key]["median"]) and positive(rep["ratios"][key]["best"]), key
        m = rep["measurements"][key]
        for side in ("mmhub", "transformers"):
            assert all(positive(m[side][s]) for s in ("median", "min", "max")), (key, side)
        assert len(m["paired_ratio"]["per_round"]) == 1
    assert "lower" in rep["ratio_notes"]
    for stage in ("stage1", "stage2"):
        for side in ("mmhub", "transformers"):
            assert 0 < rep["mfu"][stage][side]["median"] < 1, (stage, side)
    assert positive(rep["matmul_peak"]["float32"]["flops_per_s"])
    assert positive(rep["matmul_peak"]["bfloat16"]["flops_per_s"])
    assert rep["ablations"]["chunked_ce"].startswith("loss_chunk")
    assert {"no_feature_cache", "eager_attention", "row_layout"} <= set(rep["ablations"]["stage1"])
    assert {"no_feature_cache", "eager_attention", "row_layout", "no_packing", "full_logits", "chunked_ce"} \
        <= set(rep["ablations"]["stage2"])
    for b in (1, 8):
        gen = rep["ablations"][f"generate_b{b}"]
        assert {"eager_attention", "row_layout"} <= set(gen)
        assert all(positive(gen[n]["variant_over_default"]) for n in ("eager_attention", "row_layout"))
    assert rep["matmul_peak"]["float32"]["dtype"] == "float32" and rep["matmul_peak"]["bfloat16"]["dtype"] == "bfloat16"
    for stage in ("stage1", "stage2"):
        assert positive(rep["ratios"][f"{stage}_bf16_samples_per_s"]["median"])
        for side in ("mmhub", "transformers"):
            assert 0 < rep["mfu"]["bf16"][stage][side]["median"] < 1, (stage, side)
    for stage in ("stage1", "stage2"):
        for name, v in rep["ablations"][stage].items():
            if name != "default_step_s":
                assert positive(v["step_s"]["median"]) and positive(v["default_over_variant"]), (stage, name)
