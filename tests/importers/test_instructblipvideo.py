"""InstructBLIP-Video: the `instructblipvideo` import (video encoder over the BLIP tower, 4 frames, qformer with
frames: 4) matches transformers' InstructBlipVideoForConditionalGeneration in logits and greedy generation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, InstructBlipVideoForConditionalGeneration

from mmhub.importers import import_checkpoint
from mmhub.importers.instructblip import InstructBlipVideoImporter
from mmhub.testing.tiny_blip import QUERIES, VISION, greedy_pair, logit_diff, tiny_blip_folder

TOL = 1e-4
NEW_TOKENS = 16
FRAMES = 4
PROMPTS = ["What happens in the video?", "How many red squares?"]
ANSWERS = ["a red square moves", "two"]
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    side = VISION["image_size"]
    return [rng.integers(0, 255, (FRAMES, side, side, 3), dtype=np.uint8) for _ in PROMPTS]


@pytest.fixture(scope="module", params=["opt", "t5"])
def imported(request, tmp_path_factory) -> tuple[str, Any, Any, Any]:
    folder = tiny_blip_folder(tmp_path_factory.mktemp(f"instructblipvideo-{request.param}"), "instructblipvideo",
                              request.param, seed=10)
    model = import_checkpoint(folder)
    hf = InstructBlipVideoForConditionalGeneration.from_pretrained(folder).eval()
    return request.param, model, hf, AutoProcessor.from_pretrained(folder)


def test_instructblipvideo_import_logits_equal_transformers(imported, clips) -> None:
    lm, model, hf, processor = imported
    assert model.plan.tokens_per_item("video") == FRAMES * QUERIES
    diff = logit_diff(model, hf, processor, clips, PROMPTS, ANSWERS, modality="video")
    MEASURED[f"instructblipvideo-{lm}"] = diff
    assert diff <= TOL, f"instructblipvideo ({lm}): max abs logit diff {diff:.3g} > {TOL}"


def test_instructblipvideo_import_greedy_generation_equals_transformers(imported, clips) -> None:
    lm, model, hf, processor = imported
    ours, theirs = greedy_pair(model, hf, processor, clips, PROMPTS, NEW_TOKENS, modality="video")
    assert ours == theirs, f"instructblipvideo ({lm}): greedy tokens differ: mmhub {ours} vs transformers {theirs}"
    assert all(len(row) >= NEW_TOKENS // 2 for row in ours), f"too few tokens generated to compare: {ours}"


def test_instructblipvideo_export_reloads_in_transformers_with_equal_logits(imported, clips, tmp_path) -> None:
    lm, model, hf, _ = imported
    out = InstructBlipVideoImporter().export(model, tmp_path / "exported")
    again = InstructBlipVideoForConditionalGeneration.from_pretrained(out).eval()
    diff = logit_diff(model, again, AutoProcessor.from_pretrained(out), clips, PROMPTS, ANSWERS, modality="video")
    MEASURED[f"instructblipvideo-{lm} export"] = diff
    assert diff <= TOL, f"instructblipvideo ({lm}) export: max abs logit diff {diff:.3g} > {TOL}"
    ours, theirs = again.state_dict(), hf.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("layout", ["pre_ln", "blip2"])
def test_qformer_frames_reads_each_frame_on_its_own(layout: str) -> None:
    """frames: 3 -> each frame's tokens through the Q-Former alone, outputs concatenated in time order."""
    from mmhub.interfaces import BuildContext
    from mmhub.projectors.qformer import QFormerProjector

    settings = {"num_queries": 2, "layers": 2, "width": 16, "heads": 2, "in_dim": 8, "out_dim": 12, "layout": layout}
    ctx = BuildContext(resolve=lambda uri: uri)
    torch.manual_seed(0)
    video = QFormerProjector(QFormerProjector.Config.model_validate({**settings, "frames": 3}), ctx).eval()
    image = QFormerProjector(QFormerProjector.Config.model_validate(settings), ctx).eval()
    image.load_state_dict(video.state_dict())
    feats = torch.randn(2, 3 * 5, 8, generator=torch.Generator().manual_seed(1))
    assert QFormerProjector.num_tokens(video.config, 15) == 6
    with torch.no_grad():
        out = video(feats)
        per_frame = torch.cat([image(feats[:, 5 * f:5 * (f + 1)]) for f in range(3)], 1)
    assert out.shape == (2, 6, 12) and torch.allclose(out, per_frame, atol=1e-6)
    with pytest.raises(ValueError, match="not 3 equal frames"):
        QFormerProjector.num_tokens(video.config, 16)


def test_report_measured_differences() -> None:
    print("\nmeasured:", {k: f"{v:.3g}" for k, v in MEASURED.items()})
