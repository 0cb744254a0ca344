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


class SlotMerge(BaseModel):
    """How one slot is merged: the method's name, the models' weights, and the method's settings (extra keys)."""

    model_config = ConfigDict(extra="allow")

    method: str
    weights: dict[str, float] | None = None

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


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
