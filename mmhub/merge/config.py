"""The schema of a ``mmhub merge`` YAML: the models, the base, and per slot the method, weights and settings.

```yaml
models:                       # name -> any reference mmhub.load takes (saved folder, preset, spec, "default")
  instruct: runs/a/instruct/model
  domain: runs/b/instruct/model
base: instruct                # slots not named below are taken from it; the task-vector methods' base
seed: 0                       # fixes DARE's random drops
adapters: fold               # LoRA adapters: fold (into the weights, then merge) or combine (merge as an adapter)
adapter_rank: 16             # combine: the merged adapter's rank (default: the sum of the merged adapters' ranks)
slots:
  projectors.image: {method: linear, weights: {instruct: 0.5, domain: 0.5}}
  backbone: {method: ties, weights: {domain: 1.0}, density: 0.5}
  # a weight may also vary over the slot's tensors (mmhub.merge.tensor_weights): a gradient over the layers,
  #   weights: {domain: [1.0, 0.5]}
  # or rules by name part and layers, the first that covers a tensor wins:
  #   weights: {domain: [{layers: [0, 1, 2], value: 1.0}, {filter: mlp, value: 0.5}, {value: 0.8}]}
inputs:                      # for data-aware methods (regmean): per merged model, data of its own skill
  domain: {data: {type: llava_json, path: data/domain.json}, limit: 64}
search:                      # optional: weights chosen on a validation split (mmhub.merge.search)
  weights: {domain: [0.5, 1.0, 1.5]}
  task: easy_vqa
  split: train
  limit: 200
```

A slot is a component path as `mmhub assemble` prints it (``encoders.image``, ``projectors.image``, ``backbone``,
``injectors.NAME``, ``output_projectors.M``, ``signal_tokens``); ``weights`` defaults to 1 for every model other than
the base (every model for methods that take no base). Other keys are the method's settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmhub.errors import MMHubError
from mmhub.merge.inputs import ModelInputs
from mmhub.merge.tensor_weights import WeightValue


class SlotMerge(BaseModel):
    """How one slot is merged: the method's name, the models' weights, and the method's settings (extra keys)."""

    model_config = ConfigDict(extra="allow")

    method: str
    weights: dict[str, WeightValue] | None = Field(
        None, description="model -> its weight: a number, a gradient over the slot's layers, or rules by name part "
                          "and layers (`mmhub.merge.tensor_weights`)")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class WeightSearch(BaseModel):
    """Merge weights chosen on held-out data (`mmhub.merge.search`): every combination of the candidate weights is
    merged and scored with an evaluation task on a validation split; the best is saved."""

    model_config = ConfigDict(extra="forbid")
    weights: dict[str, list[WeightValue]] = Field(
        min_length=1, description="model -> the weights to try for it (in every merged slot that merges it); each a "
                                  "number, a gradient or rules, as a slot's weights")
    settings: dict[str, list[Any]] = Field(
        default_factory=dict, description="method setting -> the values to try (e.g. density: [0.3, 0.5]), in every "
                                          "merged slot whose method takes the setting")
    task: str = Field("easy_vqa", description="a registered evaluation task (`mmhub plugins` lists them)")
    split: str = Field("train", description="the split scored; never the split you report (test is refused)")
    limit: int = Field(200, ge=1, description="the first N items of the split")
    batch_size: int = Field(32, ge=1)
    objective: Literal["keep_skills", "accuracy"] = Field(
        "keep_skills", description="keep_skills: maximise the worst per-type margin to the best merged model on that "
                                   "type (each specialist's skill kept); accuracy: the overall score")
    max_candidates: int = Field(64, ge=1, description="refuse a grid with more combinations than this")


class MergeConfig(BaseModel):
    """A whole merge: models by name, the base, per-slot methods."""

    model_config = ConfigDict(extra="forbid")

    models: dict[str, str] = Field(min_length=1)
    base: str
    seed: int = 0
    adapters: Literal["fold", "combine"] = Field(
        "fold", description="fold: LoRA folded into each model's weights, then the weights merged (the result carries "
                            "no adapter); combine: the adapters' updates merged into one adapter over the shared base "
                            "(`mmhub.merge.adapters`)")
    adapter_rank: int | None = Field(None, ge=1, description="combine: the merged adapter's rank (default: the sum "
                                                             "of the merged adapters' ranks, exact for linear merges)")
    slots: dict[str, SlotMerge] = Field(default_factory=dict)
    inputs: dict[str, ModelInputs] = Field(
        default_factory=dict, description="model -> the data its linear layers' inputs are recorded on, for the "
                                          "methods that use them (regmean)")
    search: WeightSearch | None = None


def read_config(path: str | Path) -> MergeConfig:
    """Parse and validate a merge YAML; every problem in one `MMHubError` naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise MMHubError(f"{path}: cannot read the merge config ({type(exc).__name__}: {exc})") from None
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"  - {'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()]
        raise MMHubError(f"{path}: {len(lines)} problem(s) in the merge config:\n" + "\n".join(lines)) from None
