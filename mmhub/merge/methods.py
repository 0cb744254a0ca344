"""Merge methods: how one tensor of several models becomes one tensor, per component slot.

Each method is a `MergeMethod` subclass registered through ``register_merge_methods`` (a third party adds one
without a fork). ``merge(base, tensors, weights)`` gets the base model's tensor (None for methods that need no base),
the models' tensors (same shape) and one weight per model. Task-vector methods work on the differences to the base
and use peft's maintained implementations (`peft.utils.merge_utils`: TIES' trimming and sign election, DARE's random
drop and rescale); linear and SLERP follow mergekit's definitions.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


class MergeSettings(BaseModel):
    """Settings every method accepts (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")


class MergeMethod:
    """One way to merge a tensor; subclasses set ``name``, ``Settings`` and ``needs_base`` and implement `merge`."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type[MergeSettings]] = MergeSettings
    needs_base: ClassVar[bool] = False
    needs_inputs: ClassVar[bool] = False  # True: linear layers' weights go to `merge_inputs` with Gram matrices
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None

    def __init__(self, settings: MergeSettings) -> None:
        self.settings = settings
        self.models: list[str] = []

    def bind(self, models: list[str]) -> list[str]:
        """Learn the merged models' names, in the order `merge` gets their tensors; returns the problems of settings
        given per model (an empty list when there are none)."""
        self.models = list(models)
        return []

    def merge(self, base: torch.Tensor | None, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        raise NotImplementedError

    def merge_inputs(self, base: torch.Tensor | None, tensors: list[torch.Tensor], weights: list[float],
                     grams: list[torch.Tensor]) -> torch.Tensor:
        """A linear layer's weight (out x in) merged knowing each model's input Gram matrix (in x in) on its own
        data (`mmhub.merge.inputs`); only called when ``needs_inputs``."""
        raise NotImplementedError


class Linear(MergeMethod):
    """Weighted average of the models' tensors (divided by the weights' sum unless ``normalize: false``)."""

    class Settings(MergeSettings):
        normalize: bool = True

    name = "linear"

    def merge(self, base: torch.Tensor | None, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        out = sum(w * t.double() for w, t in zip(weights, tensors, strict=True))
        total = sum(weights)
        if self.settings.normalize and total != 0:
            out = out / total
        return out.to(tensors[0].dtype)


class Slerp(MergeMethod):
    """Spherical interpolation between two models' tensors at ``t`` (0: the first, 1: the second); nearly parallel
    tensors fall back to linear interpolation, as mergekit does."""

    class Settings(MergeSettings):
        t: float = Field(0.5, ge=0.0, le=1.0)

    name = "slerp"
    min_models = max_models = 2

    def merge(self, base: torch.Tensor | None, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        a, b = (x.double().flatten() for x in tensors)
        t = self.settings.t
        na, nb = a.norm(), b.norm()
        if na == 0 or nb == 0:
            return ((1 - t) * a + t * b).view_as(tensors[0]).to(tensors[0].dtype)
        dot = torch.clamp((a / na) @ (b / nb), -1.0, 1.0)
        if abs(float(dot)) > 0.9995:
            out = (1 - t) * a + t * b
        else:
            omega = math.acos(float(dot))
            s = math.sin(omega)
            out = (math.sin((1 - t) * omega) / s) * a + (math.sin(t * omega) / s) * b
        return out.view_as(tensors[0]).to(tensors[0].dtype)


def _deltas(base: torch.Tensor | None, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    assert base is not None
    return [t.double() - base.double() for t in tensors]


def _plus_base(base: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """The merged task vector added back to the base, in the base's dtype."""
    assert base is not None
    return (base.double() + delta).to(base.dtype)


class TaskArithmetic(MergeMethod):
    """The base plus the weighted sum of the models' task vectors (model - base)."""

    name = "task_arithmetic"
    needs_base = True

    def merge(self, base: torch.Tensor | None, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        from peft.utils.merge_utils import task_arithmetic

        delta = task_arithmetic(_deltas(base, tensors), torch.tensor(weights, dtype=torch.float64))
        return _plus_base(base, delta)


def _density_ok(v: float | dict[str, float]) -> float | dict[str, float]:
    values = v.values() if isinstance(v, dict) else [v]
    bad = [x for x in values if not 0.0 < x <= 1.0]
    if bad or (isinstance(v, dict) and not v):
        raise ValueError(f"density must be in (0, 1], one number or one per merged model (got {v!r})")
    return v


class _Sparsifying(MergeMethod):
    """Task-vector methods that thin each task vector to a ``density`` first (TIES by magnitude, DARE at random),
    then combine: one density for every model, or one per model (``density: {a: 0.9, b: 0.3}``, as mergekit's
    per-model ``density``). One density calls peft's own function; per-model densities thin each task vector with
    peft's ``prune`` and combine with its sign election and disjoint merge, the same steps."""

    class Settings(MergeSettings):
        density: float | dict[str, float] = 0.5

        @field_validator("density")
        @classmethod
        def _density(cls, v: float | dict[str, float]) -> float | dict[str, float]:
            return _density_ok(v)

    needs_base = True
    prune_method: ClassVar[str] = "magnitude"
    elect_signs: ClassVar[bool] = True
    combine: ClassVar[str] = ""

    def bind(self, models: list[str]) -> list[str]:
        super().bind(models)
        d = self.settings.density
        if not isinstance(d, dict):
            return []
        missing, unknown = [m for m in models if m not in d], [m for m in d if m not in models]
        if missing or unknown:
            return [f"density is given per model but names {sorted(d)} while the merged models are {list(models)}"
                    f" (missing: {missing or 'none'}, not merged: {unknown or 'none'}); give every merged model one, "
                    "or one number for all"]
        return []

    def _densities(self, n: int) -> list[float]:
        d = self.settings.density
        return [float(d[m]) for m in self.models] if isinstance(d, dict) else [float(d)] * n

    def _sign_method(self) -> str:
        return "total"

    def merge(self, base: torch.Tensor | None, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        from peft.utils import merge_utils as mu

        deltas, w = _deltas(base, tensors), torch.tensor(weights, dtype=torch.float64)
        densities = self._densities(len(tensors))
        if len(set(densities)) == 1:  # peft's function as it is
            args = (deltas, w, densities[0]) + ((self._sign_method(),) if self.elect_signs else ())
            return _plus_base(base, getattr(mu, self.combine)(*args))
        rescale = self.prune_method == "random"
        thinned = torch.stack([t if d >= 1 else mu.prune(t, d, method=self.prune_method, rescale=rescale)
                               for t, d in zip(deltas, densities, strict=True)])  # 1: kept whole, as peft does
        weighted = thinned * mu.reshape_weight_task_tensors(thinned, w)
        if not self.elect_signs:
            return _plus_base(base, weighted.sum(dim=0))
        mask = mu.calculate_majority_sign_mask(thinned, method=self._sign_method())
        return _plus_base(base, mu.disjoint_merge(weighted, mask))


class Ties(_Sparsifying):
    """TIES-merging of the task vectors (trim to the top ``density``, elect signs, merge agreeing entries) + base.

    Each task vector keeps its top ``density`` fraction by magnitude (one density, or one per model), signs are
    elected per entry (``majority_sign_method``), and only the entries agreeing with the elected sign are combined."""

    class Settings(_Sparsifying.Settings):
        majority_sign_method: Literal["total", "frequency"] = "total"

    name = "ties"
    combine = "ties"

    def _sign_method(self) -> str:
        return self.settings.majority_sign_method


class _Dare(_Sparsifying):
    prune_method = "random"
    elect_signs = False


class DareLinear(_Dare):
    """DARE: task vectors randomly thinned to ``density`` and rescaled, then summed with the weights, + base.

    Each entry is dropped with probability 1 - ``density`` and the rest multiplied by 1 / ``density``; the run's
    ``seed`` fixes the drops."""

    name = "dare_linear"
    combine = "dare_linear"


class DareTies(_Dare):
    """DARE's random drop and rescale, then TIES' sign election; added to the base."""

    name = "dare_ties"
    combine = "dare_ties"
    elect_signs = True


class RegMean(MergeMethod):
    """RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models"): each
    linear layer's merged weight minimises the distance between its outputs and each model's outputs on that model's
    own inputs, sum_i ||X_i W - X_i W_i||², solved in closed form, W = (sum_i G_i)^-1 sum_i G_i W_i with the input
    Gram matrices G_i = X_iᵀ X_i (here averaged over tokens, scaled by the model's weight). ``alpha`` scales the
    matrices' off-diagonal entries (the paper's regularisation: 1 is the plain least squares, 0 a per-input-feature
    weighted mean). Tensors that are no linear layer's weight (biases, norms, embeddings, tied heads) are the
    weighted mean, as in the paper. Needs each merged model's data (``inputs:`` in the merge config); no base."""

    class Settings(MergeSettings):
        alpha: float = Field(0.9, ge=0.0, le=1.0)

    name = "regmean"
    needs_inputs = True

    def merge(self, base: torch.Tensor | None, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        return Linear(Linear.Settings()).merge(None, tensors, weights)

    def merge_inputs(self, base: torch.Tensor | None, tensors: list[torch.Tensor], weights: list[float],
                     grams: list[torch.Tensor]) -> torch.Tensor:
        a = self.settings.alpha
        scaled = [w * (a * g.double() + (1 - a) * torch.diag(torch.diagonal(g.double())))
                  for w, g in zip(weights, grams, strict=True)]
        lhs = sum(scaled)
        rhs = sum(g @ t.double().T for g, t in zip(scaled, tensors, strict=True))  # (in, out)
        try:
            solved = torch.linalg.solve(lhs, rhs)
        except RuntimeError:  # singular: an input feature no model's data ever moved; least squares picks the smallest
            solved = torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution
        return solved.T.contiguous().to(tensors[0].dtype)


BUILTIN: tuple[type[MergeMethod], ...] = (Linear, Slerp, TaskArithmetic, Ties, DareLinear, DareTies, RegMean)


def method_settings(cls: type[MergeMethod], params: dict[str, Any]) -> MergeSettings:
    """Validate `params` against the method's settings (pydantic's error lists every bad key)."""
    return cls.Settings.model_validate(params)
