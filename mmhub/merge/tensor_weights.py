"""Merge weights that vary over a slot's tensors: gradients over its layers and rules by name or layer.

A model's weight in a slot is one of:

- a number: the same weight for every tensor;
- a list of numbers, a *gradient* (mergekit's): the anchors are spread evenly from the slot's first layer to its last
  and the weight of a layer is interpolated linearly between its two neighbouring anchors (``[1, 0]``: 1 at the
  first layer, 0 at the last, 0.5 half way); tensors outside the numbered layers take the first anchor when they
  come before the layers in the slot's order (embeddings), the last otherwise (final norm, head);
- a list of *rules*, each ``{value, filter, layers}``: the first rule whose ``filter`` is part of the tensor's name
  and whose ``layers`` hold the tensor's layer gives the weight (a number or a gradient); a rule with neither is
  the default. A tensor no rule matches is a pre-flight error.

A tensor's layer is the first number in its name inside the slot (``model.layers.3.mlp.up_proj.weight`` -> 3), as
for LoRA's ``layers`` (`mmhub.regimes.layer_index`).
"""

from __future__ import annotations

from typing import Annotated, Any, Iterable, Union

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError, field_validator

from mmhub.regimes import layer_index, layer_ranges


class WeightRule(BaseModel):
    """One rule of a per-tensor weight: the tensors it covers (name part, layers) and their weight."""

    model_config = ConfigDict(extra="forbid")

    value: float | list[float] = Field(description="the weight: a number, or a gradient over the slot's layers")
    filter: str | None = Field(None, min_length=1, description="covers tensors whose name contains this text")
    layers: list[int] | None = Field(None, description="covers tensors of these layers (first number in the name): "
                                                      "a list, or runs such as '0-14' or '0-9,20'")

    @field_validator("value")
    @classmethod
    def _gradient_ok(cls, v: float | list[float]) -> float | list[float]:
        if isinstance(v, list) and not v:
            raise ValueError("value is an empty gradient: give a number or at least one anchor")
        return v

    @field_validator("layers", mode="before")
    @classmethod
    def _layer_runs(cls, v: Any) -> Any:
        """``"0-14"`` or ``"0-9,20"`` as the list of those layers."""
        if not isinstance(v, str):
            return v
        out: list[int] = []
        for part in v.replace(" ", "").split(","):
            lo, sep, hi = part.partition("-")
            if not lo.isdigit() or (sep and not hi.isdigit()) or (sep and int(hi) < int(lo)):
                raise ValueError(f"layers {v!r}: write layer numbers and runs such as '0-14' or '0-9,20'")
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        return out

    @field_validator("layers")
    @classmethod
    def _layers_ok(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("layers is empty: list the layer indices the rule covers, or leave it out")
            if any(i < 0 for i in v):
                raise ValueError(f"layers {[i for i in v if i < 0]} are negative: layer indices count from 0")
        return v

    def covers(self, key: str, layer: int | None) -> bool:
        if self.filter is not None and self.filter not in key:
            return False
        return self.layers is None or (layer is not None and layer in self.layers)


def _weight_value(v: Any) -> float | list[float] | list[WeightRule]:
    """Parse one weight: a number, a gradient (numbers), or rules (mappings); one clear message otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, float, list)):
        raise ValueError(f"a weight is a number, a list of numbers (a gradient over the slot's layers) or a list of "
                         f"rules ({{value, filter, layers}}); got {v!r}")
    if not isinstance(v, list):
        return float(v)
    if not v:
        raise ValueError("the weight is an empty list: give a number, a gradient's anchors, or rules")
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return [float(x) for x in v]
    if all(isinstance(x, (dict, WeightRule)) for x in v):
        rules = []
        for i, x in enumerate(v):
            try:
                rules.append(x if isinstance(x, WeightRule) else WeightRule.model_validate(x))
            except ValidationError as exc:
                bad = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(rule)'}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"rule {i}: {bad}") from None
        return rules
    raise ValueError(f"a weight list holds numbers (a gradient) or rules (mappings), not both or other things; "
                     f"got {v!r}")


WeightValue = Annotated[Union[float, list[float], list[WeightRule]], PlainValidator(_weight_value),
                        PlainSerializer(lambda v: plain(v))]


def is_uniform(value: Any) -> bool:
    """Whether `value` is one number for the whole slot."""
    return isinstance(value, (int, float))


def gradient_at(anchors: list[float], position: float) -> float:
    """The linear interpolation of `anchors` (spread evenly over [0, 1]) at `position` in [0, 1]."""
    if len(anchors) == 1:
        return float(anchors[0])
    x = min(max(position, 0.0), 1.0) * (len(anchors) - 1)
    i = min(int(x), len(anchors) - 2)
    frac = x - i
    return float(anchors[i] * (1 - frac) + anchors[i + 1] * frac)


def positions(keys: Iterable[str]) -> dict[str, tuple[int | None, float]]:
    """Per tensor name of a slot (in the slot's order): its layer and its position in [0, 1] for gradients."""
    keys = list(keys)
    layers = [layer_index(k) for k in keys]
    numbered = sorted({i for i in layers if i is not None})
    rank = {layer: r for r, layer in enumerate(numbered)}
    span = max(len(numbered) - 1, 1)
    first_numbered = next((j for j, i in enumerate(layers) if i is not None), len(keys))
    out = {}
    for j, (key, layer) in enumerate(zip(keys, layers, strict=True)):
        if layer is not None:
            out[key] = (layer, rank[layer] / span)
        else:
            out[key] = (None, 0.0 if j < first_numbered else 1.0)
    return out


def weight_for(value: WeightValue, key: str, layer: int | None, position: float) -> float | None:
    """The weight of tensor `key` under `value`; None when `value` is rules and none covers the tensor."""
    if is_uniform(value):
        return float(value)  # type: ignore[arg-type]
    assert isinstance(value, list)
    if all(isinstance(v, (int, float)) for v in value):
        return gradient_at([float(v) for v in value], position)
    for rule in value:
        if rule.covers(key, layer):
            v = rule.value
            return float(v) if is_uniform(v) else gradient_at([float(a) for a in v], position)
    return None


def uncovered(value: WeightValue, keys: Iterable[str]) -> list[str]:
    """The tensors of a slot no rule of `value` covers (always none for a number or a gradient)."""
    return [k for k, (layer, pos) in positions(keys).items() if weight_for(value, k, layer, pos) is None]


def plain(value: Any) -> Any:
    """`value` as JSON-able data (rules as dicts without unset keys)."""
    if isinstance(value, WeightRule):
        return value.model_dump(exclude_none=True)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def describe(value: Any) -> str:
    """A short form for logs: ``1``, ``[1, 0.5]``, ``{layers 15-29: 0.5; 1}``."""
    if is_uniform(value):
        return f"{value:g}"
    if isinstance(value, dict):  # a setting given per model, e.g. density: {a: 0.9, b: 0.3}
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
    if all(isinstance(v, (int, float)) for v in value):
        return "[" + ", ".join(f"{v:g}" for v in value) + "]"
    parts = []
    for rule in value:
        rule = rule if isinstance(rule, WeightRule) else WeightRule.model_validate(rule)
        where = " ".join(x for x in (
            f"'{rule.filter}'" if rule.filter else "",
            f"layers {layer_ranges(rule.layers)}" if rule.layers else "") if x)
        parts.append(f"{where}: {describe(rule.value)}" if where else describe(rule.value))
    return "{" + "; ".join(parts) + "}"


__all__ = ["WeightRule", "WeightValue", "is_uniform", "gradient_at", "positions", "weight_for", "uncovered", "plain",
           "describe"]
