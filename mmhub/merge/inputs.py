"""What each model's linear layers see on its own data: input Gram matrices for data-aware merges (RegMean).

A merge config's ``inputs`` section names, per merged model, data in any format `mmhub.data.load_dataset` takes
(the data the model was trained on, or any sample of its skill) and how many samples to run. `gram_matrices` runs
the model on those samples one at a time (whole conversations, answers included, as in training; no padding to
mask) and records, for every ``nn.Linear`` of a slot, the mean of ``x xᵀ`` over the tokens it saw: the matrix
``XᵀX / n`` of RegMean (Jin et al., 2023). Averaging over tokens makes the number of samples given per model not
weigh it; the merge's weights do. A linear layer whose weight is tied to another tensor (an LLM's head tied to its
embeddings) gets no matrix: it is merged as its tied twin is. Samples that cannot be encoded are skipped and
counted; none left is an error naming the data.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mmhub.errors import InputError, MMHubError


class ModelInputs(BaseModel):
    """One model's data for a data-aware merge."""

    model_config = ConfigDict(extra="forbid")

    data: Any = Field(description="a dataset spec as in a training stage: {type: NAME, ...}, a path, or a list")
    limit: int = Field(64, ge=1, description="the first N samples are run")


def _untied_linears(module: nn.Module) -> dict[str, nn.Linear]:
    """The slot's linear layers by the name of their weight in its state dict, leaving out tied weights."""
    owners: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    return {f"{name}.weight": m for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and owners.get(id(m.weight), 0) == 1}


@torch.no_grad()
def gram_matrices(model: Any, slot_module: nn.Module, inputs: ModelInputs, where: str) -> dict[str, torch.Tensor]:
    """Per untied linear layer of `slot_module` (its weight's name): the mean ``x xᵀ`` (float64) over the tokens of
    `inputs`' samples run through `model`."""
    from mmhub.data import load_dataset

    layers = _untied_linears(slot_module)
    sums = {k: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for k, m in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def hook(key: str):
        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[key].add_(x.T @ x)
            counts[key] += x.shape[0]
        return record

    try:
        data = load_dataset(inputs.data)
    except MMHubError as exc:
        raise MMHubError(f"{where}.data: {exc}") from None
    handles = [m.register_forward_pre_hook(hook(k)) for k, m in layers.items()]
    was_training = model.training
    model.eval()
    used, skipped = 0, []
    try:
        for i in range(min(inputs.limit, len(data))):
            try:
                sample = data[i]
                enc = model.processor.encode(sample.messages, sample.media)
                batch = model.processor.collate([enc])
            except (InputError, OSError, ValueError, KeyError) as exc:
                skipped.append(f"sample {i}: {exc}")
                continue
            model(batch["input_ids"], batch["attention_mask"], media=batch["media"], return_logits=False)
            used += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if used == 0:
        why = f" ({len(skipped)} skipped; first: {skipped[0]})" if skipped else ""
        raise MMHubError(f"{where}: no sample of its data could be run{why}; give data the model's processor can "
                         "encode (conversations with the model's modalities)")
    return {k: s / counts[k] for k, s in sums.items() if counts[k]}


__all__ = ["ModelInputs", "gram_matrices"]
