"""Runtime options: settings that change how fast a model computes and how much memory it holds, never what it is.

A spec's ``runtime:`` block holds them, apart from the model's definition (components, template, stages).
Each option reaches a component only through a capability the component declares (`Backbone.only_at`,
`Backbone.supports_packing`): a backbone without the capability runs as before.

* ``weight_layout``: ``auto`` stores the backbone's wide linear weights column-major, which CPU decoding
  streams about twice as fast (`mmhub.layout`); ``row`` keeps every weight row-major, as built;
* ``loss_chunk``: chunked cross-entropy, that many labelled positions per chunk (0 = all at once); each
  chunk's logits are recomputed in the backward pass, so at most one chunk's logits is ever held; ``auto`` (the
  default) chunks only micro-batches whose labelled logits are large (`loss_chunk_for`);
* ``activation_checkpointing``: each backbone block keeps only its input and is recomputed in the backward pass
  (`mmhub.activation_checkpointing`, on `Backbone.checkpoint_blocks`); the last block's ``labelled_only_mlp``
  shortcut is off then (the recomputation would run it at every position);
* ``compile``: each backbone block compiled with ``torch.compile`` (regional compilation: one block's graph,
  reused by every block of the same shape; `mmhub.activation_checkpointing.compile_blocks`);
* ``labelled_only_mlp``: in a training forward that returns no logits, the backbone's last MLP runs only at
  the positions whose state the loss reads (`Backbone.only_at`).

Specs written before the ``runtime:`` block set ``loss_chunk`` and ``weight_layout`` at the top level;
`lift_legacy_options` moves them into it, so those specs and the model folders saved with them still load.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

LEGACY_OPTIONS = ("loss_chunk", "weight_layout")  # top-level spec keys that are runtime options
# loss_chunk "auto": chunks of this many labelled positions once positions x vocabulary reaches AUTO_CHUNK_FROM
# (benchmarks/results/scaling_profile.json: at 12k positions x 8,000 words the unchunked loss spends 4 s of a 12.6 s
# step zero-filling and differentiating the full logits; chunked, the step takes 9.6 s)
AUTO_LOSS_CHUNK, AUTO_CHUNK_FROM = 1024, 1 << 25


class RuntimeOptions(BaseModel):
    """Speed and memory settings of a model (`mmhub.runtime`); outputs stay the same up to float summation order."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    weight_layout: Literal["auto", "row"] = Field(
        "auto", description="auto: the backbone's wide linear weights (out >= in features: LM head, q/o, MLP "
                            "gate/up) are stored column-major, which CPU decoding streams about twice as fast "
                            "(mmhub.layout); row: every weight row-major, as built")
    loss_chunk: Annotated[int, Field(ge=0, le=1 << 24)] | Literal["auto"] = Field(
        "auto",
        description="chunked cross-entropy: labelled positions per chunk (0 = all at once). The LM head "
                    "and the loss run chunk by chunk and each chunk's logits are recomputed in the backward "
                    "pass, so at most one chunk's logits (chunk x vocabulary floats) is ever held. auto: "
                    f"{AUTO_LOSS_CHUNK} positions per chunk once a micro-batch's labelled logits reach "
                    f"{AUTO_CHUNK_FROM:,} floats (measured: as fast at 49M, 1.3x faster at 98M), else all at once")
    activation_checkpointing: bool = Field(
        False, description="keep only each backbone block's input in a training forward and recompute the block in "
                           "the backward pass (mmhub.activation_checkpointing): activation memory per token drops "
                           "to about one hidden vector per block, for about one more forward pass of compute")
    compile: bool = Field(
        False, description="compile each backbone block with torch.compile (inductor; dynamic shapes) the first time "
                           "it runs: fused elementwise kernels for training and prefill, at a one-off compile cost "
                           "(seconds to minutes); not together with activation_checkpointing")
    labelled_only_mlp: bool = Field(
        True, description="in a training forward that returns no logits, run the backbone's last MLP only at the "
                          "positions the loss reads (where the backbone's `only_at` supports it)")


def loss_chunk_for(setting: int | str, positions: int, vocab: int) -> int:
    """Labelled positions per loss chunk for a micro-batch (0: all at once): the setting, or for ``auto``
    `AUTO_LOSS_CHUNK` once ``positions x vocab`` reaches `AUTO_CHUNK_FROM`."""
    if setting == "auto":
        return AUTO_LOSS_CHUNK if positions * vocab >= AUTO_CHUNK_FROM else 0
    return int(setting)


def runtime_problems(options: RuntimeOptions) -> list[str]:
    """Combinations of runtime options that do not work together, each with the fix."""
    if options.compile and options.activation_checkpointing:
        return ["compile and activation_checkpointing are not supported together yet (a compiled block would "
                "recompute outside the compiled graph); keep one of them"]
    return []


def lift_legacy_options(data: Any) -> Any:
    """A spec dict with top-level ``loss_chunk`` / ``weight_layout`` -> the same dict with them under ``runtime``.

    Raises ValueError when an option is given both ways with different values."""
    if not isinstance(data, dict) or not any(k in data for k in LEGACY_OPTIONS):
        return data
    data = dict(data)
    runtime = data.get("runtime") or {}
    if not isinstance(runtime, dict):  # a RuntimeOptions instance, or a wrong type pydantic reports itself
        return data
    runtime = dict(runtime)
    for key in LEGACY_OPTIONS:
        if key not in data:
            continue
        value = data.pop(key)
        if key in runtime and runtime[key] != value:
            raise ValueError(f"{key} is set twice: {value!r} at the top level and {runtime[key]!r} under runtime; "
                             f"keep only runtime.{key}")
        runtime[key] = value
    data["runtime"] = runtime
    return data
