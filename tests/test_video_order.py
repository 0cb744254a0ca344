"""Video connectors see frame order: reversing a clip's frames changes what the LLM receives.

A Q-Former that reads every frame's tokens at once is permutation-invariant over them, so without a temporal
signal a clip and its reverse give the LLM the same tokens. The video presets read frames either one at a time
(InstructBLIP-Video / X-InstructBLIP / X-LLM: the LLM's own positions order the frames) or through learned
frame-position embeddings (Video-LLaMA's video Q-Former; VideoChat's stand-in), and a tiny model learns a task
that needs the order (which way does the square move?) on clips unlike its training ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from mmhub.assembly import build

VIDEO_PRESETS = ["videochat", "video-llama", "instructblip", "x-instructblip", "x-llm"]


def _clip(frames: int = 4, size: int = 56, seed: int = 0) -> np.ndarray:
    """`frames` distinct random frames (F, H, W, 3) uint8."""
    return np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def _logits(model: Any, clip: np.ndarray) -> torch.Tensor:
    """The LLM's logits over a one-question conversation about `clip` (instruction-aware projectors read it too)."""
    batch = model.batch(["<video>\nWhat happens in this clip?"], [{"video": [clip]}], add_generation_prompt=True)
    with torch.no_grad():
        return model(**batch).logits[0]


@pytest.mark.parametrize("name", VIDEO_PRESETS)
def test_video_preset_output_changes_when_the_frames_are_reversed(name: str) -> None:
    model = build(f"{name}:tiny").eval()
    clip = _clip(model.encoders["video"].config.num_frames)
    forward, backward = _logits(model, clip), _logits(model, clip[::-1].copy())
    gap = (forward - backward).abs().max().item()
    assert gap > 1e-4, f"{name}: reversing the frames left the LLM's logits unchanged (max |diff| {gap:.2e})"


def _qformer(**settings: Any) -> Any:
    from mmhub.interfaces import BuildContext
    from mmhub.projectors.qformer import QFormerConfig, QFormerProjector

    torch.manual_seed(0)
    config = QFormerConfig(in_dim=24, out_dim=16, num_queries=4, layers=2, width=32, heads=4, **settings)
    return QFormerProjector(config, BuildContext(resolve=lambda uri: uri)).eval()


@pytest.mark.parametrize("layout", ["pre_ln", "blip2"])
@pytest.mark.parametrize("read_frames", ["each", "together"])
def test_qformer_frame_positions_make_frame_order_visible(layout: str, read_frames: str) -> None:
    """Reading frames together, a Q-Former gives a clip and its reverse the same tokens; with frame positions it
    does not. Reading each frame alone, its output is the frames' outputs in the frames' order, and frame positions
    make the tokens themselves depend on where a frame sits."""
    frames, per_frame = 4, 5
    x = torch.randn(2, frames * per_frame, 24)
    reverse = x.view(2, frames, per_frame, 24).flip(1).reshape_as(x)
    blind = _qformer(layout=layout, frames=frames, read_frames=read_frames)
    timed = _qformer(layout=layout, frames=frames, read_frames=read_frames, frame_positions=8)
    with torch.no_grad():
        out, out_rev = blind(x), blind(reverse)
        t_out, t_rev = timed(x), timed(reverse)
    if read_frames == "together":
        assert out.shape == (2, 4, 16) and torch.allclose(out, out_rev, atol=1e-5)  # order-blind
    else:
        assert out.shape == (2, frames * 4, 16)
        assert torch.allclose(out, out_rev.view(2, frames, 4, 16).flip(1).reshape_as(out), atol=1e-5)
        t_rev = t_rev.view(2, frames, 4, 16).flip(1).reshape_as(t_out)  # each frame's tokens back in place
    assert (t_out - t_rev).abs().max() > 1e-3
    assert timed.frame_position.weight.shape == (8, 24 if read_frames == "together" else 32)


def test_qformer_frame_positions_settings_are_checked() -> None:
    from mmhub.projectors.qformer import QFormerConfig

    with pytest.raises(ValueError, match="needs the frame count"):
        QFormerConfig(in_dim=8, out_dim=8, width=8, heads=2, frame_positions=4)
    with pytest.raises(ValueError, match="exceeds the 4-row frame-position table"):
        QFormerConfig(in_dim=8, out_dim=8, width=8, heads=2, frames=8, frame_positions=4)


# -- learning: which way does the square move? -------------------------------------------------------------------

SIZE, FRAMES, SIDE = 32, 4, 12
TRAIN_COLOURS = [(255, 40, 40), (40, 255, 40), (40, 40, 255), (255, 255, 40)]
HELD_OUT_COLOURS = [(255, 40, 255), (40, 255, 255), (255, 150, 40), (200, 200, 200)]
TRAIN_SPEEDS, HELD_OUT_SPEEDS = (3, 5), (4,)
TRAIN_ROWS, HELD_OUT_ROWS = range(0, SIZE - SIDE + 1, 2), range(1, SIZE - SIDE + 1, 2)


def moving_square(direction: int, colour: tuple[int, int, int], speed: int, top: int, start: int,
                  side: int) -> np.ndarray:
    """A (FRAMES, SIZE, SIZE, 3) clip of a `side`-pixel square moving `speed` pixels a frame (direction +1 right,
    -1 left) on a black background, its top edge at row `top` and its left edge at column `start` in frame 0."""
    clip = np.zeros((FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    for f in range(FRAMES):
        left = start + direction * speed * f
        clip[f, top:top + side, left:left + side] = colour
    return clip


def square_clips(n: int, colours: list[tuple[int, int, int]], speeds: tuple[int, ...], rows: range,
                 seed: int) -> tuple[list[np.ndarray], list[int]]:
    """`n` clips, half moving each way, with colours, speeds and top rows drawn from the given sets."""
    rng = np.random.default_rng(seed)
    clips, labels = [], []
    for i in range(n):
        direction = 1 if i % 2 else -1
        speed = int(rng.choice(speeds))
        travel, side = speed * (FRAMES - 1), SIDE
        start = int(rng.integers(0, SIZE - side - travel + 1)) + (travel if direction < 0 else 0)
        colour = colours[int(rng.integers(len(colours)))]
        clips.append(moving_square(direction, colour, speed, int(rng.choice(list(rows))), start, side))
        labels.append(int(direction > 0))
    return clips, labels


def _order_task_model(**projector: Any) -> Any:
    """VideoChat's tiny preset as shipped (its video projector, `projector` settings overriding it), with a 32-pixel
    frame encoder whose tokens carry their place in the frame (pixels in [0, 1], so the black background adds
    nothing, and position embeddings drawn as large as the patch embedding's weights), every frame token kept."""
    from mmhub.spec import load_spec

    spec = load_spec("videochat:tiny").model_dump(mode="json", exclude={"resolved"})
    video = spec["encoders"]["video"]
    video["frames"] = {"type": "hf_vision", "select_layer": -1, "drop_cls": True, "mean": (0, 0, 0), "std": (1, 1, 1),
                       "config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": SIZE,
                                  "patch_size": 8, "initializer_range": 1.0}}
    video["num_frames"], video["tokens_per_frame"] = FRAMES, None
    spec["projectors"]["video"].update(projector)
    spec["seed"] = 0
    return build(spec)


def order_task_accuracy(**projector: Any) -> float:
    """Held-out accuracy of the video projector (trained, with a linear read-out of its tokens in order: what the
    LLM receives) at telling left from right; the frame encoder stays frozen, as the preset's stages keep it."""
    model = _order_task_model(**projector)
    enc, proj = model.encoders["video"], model.projectors["video"]
    train_clips, train_y = square_clips(384, TRAIN_COLOURS, TRAIN_SPEEDS, TRAIN_ROWS, seed=1)
    test_clips, test_y = square_clips(200, HELD_OUT_COLOURS, HELD_OUT_SPEEDS, HELD_OUT_ROWS, seed=2)

    def features(clips: list[np.ndarray]) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_features({"video": torch.stack([enc.preprocess(c, "video") for c in clips])})["video"]

    train_f, test_f = features(train_clips), features(test_clips)
    labels = torch.tensor(train_y)
    torch.manual_seed(0)
    tokens = proj.num_tokens(proj.config, train_f.shape[1])
    readout = torch.nn.Linear(tokens * proj.config.out_dim, 2)
    opt = torch.optim.AdamW([*proj.parameters(), *readout.parameters()], lr=LR)
    gen = torch.Generator().manual_seed(0)
    proj.train()
    for _ in range(STEPS):
        idx = torch.randperm(len(train_y), generator=gen)[:BATCH]
        loss = torch.nn.functional.cross_entropy(readout(proj(train_f[idx]).flatten(1)), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    proj.eval()
    with torch.no_grad():
        predicted = readout(proj(test_f).flatten(1)).argmax(1)
    return (predicted == torch.tensor(test_y)).float().mean().item()


# measured here: 0.70 held-out (200 clips: unseen colours, speed and rows); the same run with the projector as it
# was before frame positions (frames: 1, all frame tokens read as one set) scores 0.5 (it cannot tell a clip from
# its reverse, and every clip's reverse is an equally likely clip of the other answer)
STEPS, BATCH, LR, MIN_ACCURACY = 400, 64, 2e-3, 0.62


def test_the_videochat_connector_learns_which_way_a_square_moves_on_unseen_clips() -> None:
    accuracy = order_task_accuracy()
    assert accuracy >= MIN_ACCURACY, f"held-out accuracy {accuracy:.1%} (chance 50%)"
