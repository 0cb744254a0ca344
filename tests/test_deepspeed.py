"""DeepSpeed ZeRO-2 and ZeRO-3 driving mmhub's trainer (`mmhub.train.deepspeed`): two CPU processes through
accelerate's plugin end on one process's weights; the loss scale rests on counting targets before the forward,
checked against the forward's own count; what DeepSpeed cannot run yet is refused with the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_packing import encode_all, spec

from mmhub import build
from mmhub.errors import MMHubError
from mmhub.packing import collate_packed
from mmhub.train.deepspeed import configure, deepspeed_problems
from mmhub.train.loop import Loop, Progress, counted_step
from mmhub.train.objectives import NextTokenLoss, PreferenceLoss, count_targets

from conftest import TINY_LLAMA

HERE = Path(__file__).parent
SCRIPT = HERE / "helpers" / "train_script.py"
T5 = {"model_type": "t5", "d_model": 48, "d_ff": 96, "d_kv": 12, "num_layers": 2, "num_decoder_layers": 2,
      "num_heads": 4, "vocab_size": 300}


def _run(out: Path, *args: str, deepspeed: bool, zero: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if deepspeed:
        env |= {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(zero)}
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", "2"] if deepspeed else []
    return subprocess.run([sys.executable, *launch, str(SCRIPT), str(out), *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize(("zero", "args", "reference"), [
    (2, ("2", "2"), ("8",)),  # two processes x batch 2 x 2 accumulation steps
    (3, ("4", "--no-cache"), ("8", "--no-cache")),  # ZeRO-3 runs the frozen tower every step: so does the reference
])
def test_zero_on_two_processes_ends_on_one_process_weights(tmp_path: Path, zero: int, args: tuple,
                                                           reference: tuple) -> None:
    """ZeRO-2 and ZeRO-3 on two processes against one process with batch 8: both stages (the projector, then
    projector + LoRA) end on the same weights, with the same losses logged; ZeRO-3's parameters, partitioned during
    the stage, are gathered into the saved model."""
    pytest.importorskip("deepspeed")
    ref, ds = tmp_path / "one", tmp_path / f"zero{zero}"
    r = _run(ref, *reference, deepspeed=False)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run(ds, *args, deepspeed=True, zero=zero)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "save_every 2 passed over under DeepSpeed" in r.stdout and "no checkpoint under DeepSpeed" in r.stdout
    for stage, tol in (("align", 1e-5), ("tune", 1e-4)):  # as two-process DDP: rounding alone gives < 7e-6
        a = load_file(str(ref / stage / "model" / "model.safetensors"))
        b = load_file(str(ds / stage / "model" / "model.safetensors"))
        assert a.keys() == b.keys()
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert diff < tol, f"{stage}: max |ZeRO-{zero} - one process| = {diff}"
        losses = [[json.loads(line)["loss"] for line in (run / stage / "metrics.jsonl").read_text().splitlines()
                   if '"loss"' in line] for run in (ref, ds)]
        assert len(losses[0]) == len(losses[1]) > 0
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def _padded_and_packed(model) -> list[dict]:
    enc = encode_all(model)  # a conversation with its picture first, text-only ones, two pictures in one
    batches = [model.processor.collate(enc), collate_packed(model.processor, enc, [[0, 2, 1], [4, 3, 5]])]
    return [{**b, "features": None} for b in batches]  # as the batch builder hands them on (no feature cache)


def test_targets_counted_before_the_forward_are_the_forwards_own() -> None:
    torch.manual_seed(0)
    model = build(spec(TINY_LLAMA))
    with torch.no_grad():
        for batch in _padded_and_packed(model):
            forward = model(**{k: v for k, v in batch.items() if k != "features"})
            assert NextTokenLoss().count(model, batch) == forward.num_target_tokens > 0
    seq2seq = build({**spec(TINY_LLAMA), "backbone": {"type": "hf_seq2seq_lm", "config": T5, "tokenizer": "byte"}})
    batch = seq2seq.processor.collate(encode_all(seq2seq))
    with torch.no_grad():
        assert count_targets(seq2seq, batch["labels"]) == seq2seq(**batch).num_target_tokens > 0
    assert PreferenceLoss(model).count(model, {"input_ids": torch.zeros(6, 3)}) == 3


class _Engine:
    """The DeepSpeed interface `counted_step` drives, recording the scaled losses it is handed."""

    counts_first, num_processes, device = True, 1, torch.device("cpu")

    def __init__(self) -> None:
        self.scaled: list[tuple[float, bool]] = []

    def autocast(self):
        from contextlib import nullcontext

        return nullcontext()

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        loss.backward()
        self.scaled.append((float(loss.detach()), last))

    def grad_norm(self) -> float:
        return 1.0


def _loop(model, objective, acc) -> Loop:
    return Loop(model=model, objective=objective, optimizer=None, scheduler=None, accelerator=acc, stage=None,
                total=1, max_grad_norm=1.0, progress=Progress(stage="tune", stage_index=0), next_batches=None,
                after_step=None, save=None, save_due=None, log=lambda _: None)


def test_each_micro_batch_loss_is_scaled_by_the_global_count_before_its_backward() -> None:
    torch.manual_seed(0)
    model = build(spec(TINY_LLAMA))
    model.projectors.requires_grad_(True)
    batches = _padded_and_packed(model)
    counts = [NextTokenLoss().count(model, b) for b in batches]
    acc = _Engine()
    result = counted_step(_loop(model, NextTokenLoss(), acc), batches, used=12)
    with torch.no_grad():
        sums = [model(**{k: v for k, v in b.items() if k != "features"}).loss.item() * c
                for b, c in zip(batches, counts, strict=True)]
    assert [last for _, last in acc.scaled] == [False, True]  # the boundary is the last micro-batch
    for (scaled, _), s in zip(acc.scaled, sums, strict=True):
        assert scaled == pytest.approx(s / sum(counts), rel=1e-5)  # world 1 / global count
    assert result.count == sum(counts) and result.loss == pytest.approx(sum(sums) / sum(counts), rel=1e-5)


def test_a_count_that_disagrees_with_the_forward_is_refused() -> None:
    class Miscounting(NextTokenLoss):
        def count(self, model, batch):
            return super().count(model, batch) + 1

    model = build(spec(TINY_LLAMA))
    with pytest.raises(MMHubError, match="counted .* targets in a micro-batch before its forward and"):
        counted_step(_loop(model, Miscounting(), _Engine()), _padded_and_packed(model)[:1], used=6)


def _accelerator(zero: int) -> SimpleNamespace:
    config = {"zero_optimization": {"stage": zero}}
    return SimpleNamespace(num_processes=2, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(
        deepspeed_config=config)))


def _stage(**over):
    base = {"name": "tune", "objective": "sft", "placement": {}, "save_every": None, "batch_size": 4,
            "grad_accum": 3, "max_grad_norm": 0.5}
    return SimpleNamespace(**{**base, **over})


def test_what_deepspeed_cannot_run_yet_is_refused_with_the_fix() -> None:
    assert deepspeed_problems(_accelerator(3), _stage(), NextTokenLoss()) == []
    said = deepspeed_problems(_accelerator(2), _stage(placement={"backbone": "shard"}, objective="pformer"), object())
    assert len(said) == 2
    assert "placement: shard" in said[0] and "drop the stage's placement" in said[0]
    assert "'pformer' objective cannot count" in said[1]
    with pytest.raises(MMHubError, match="stage 'tune' under DeepSpeed"):
        configure(_accelerator(2), _stage(placement={"backbone": "shard"}), NextTokenLoss())


def test_the_stage_writes_its_batch_accumulation_and_clipping_into_the_engine_config() -> None:
    acc = _accelerator(2)
    configure(acc, _stage(), NextTokenLoss())
    config = acc.state.deepspeed_plugin.deepspeed_config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (4, 3, 24, 0.5)
