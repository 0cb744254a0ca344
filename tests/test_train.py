"""The stage trainer: exact resume after SIGKILL, two-process DDP equals one process, checkpoints, metrics."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmhub import MMModel, build
from mmhub.errors import MMHubError

HERE = Path(__file__).parent
SCRIPT = HERE / "helpers" / "train_script.py"
sys.path.insert(0, str(HERE / "helpers"))
import train_script  # noqa: E402


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=e, timeout=600)


def _params(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / stage / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted single-process run (batch 8)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = _run(str(SCRIPT), str(out), "8")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_resume_after_sigkill_gives_the_same_parameters(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out), "8"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    target = out / "tune" / "checkpoints" / "step-0000002" / "progress.json"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert target.exists(), "the run never wrote the mid-stage checkpoint"
    proc.send_signal(signal.SIGKILL)  # a real kill: no cleanup handlers run
    proc.wait()
    assert not (out / "tune" / "model").exists(), "the kill came too late to test resuming mid-stage"
    r = _run(str(SCRIPT), str(out), "8", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed stage 'tune'" in r.stdout and "stage 'align' already complete" in r.stdout
    for stage in ("align", "tune"):
        a, b = _params(reference, stage), _params(out, stage)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stage}: {k} differs after resume"
    lines = [json.loads(x) for x in (out / "tune" / "metrics.jsonl").read_text().splitlines()]
    assert any("summary" in x for x in lines)


def test_two_processes_match_one_with_the_same_global_batch(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    r = _run("-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT), str(out), "4")
    assert r.returncode == 0, r.stderr[-3000:]
    for stage, tol in (("align", 1e-5), ("tune", 1e-4)):  # rounding alone gives < 3e-6 (train_script.BACKBONE)
        a, b = _params(reference, stage), _params(out, stage)
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if "projectors" in k or "lora_" in k)
        assert diff < tol, f"{stage}: max |2-process - 1-process| = {diff}"


def test_gradient_accumulation_matches_a_larger_batch(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "accum"
    r = _run(str(SCRIPT), str(out), "4", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _params(reference, "align"), _params(out, "align")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a if "projectors" in k)
    assert diff < 1e-5, diff


def test_stage_output_loads_and_keeps_the_adapter(reference: Path) -> None:
    model = MMModel.from_pretrained(reference / "tune" / "model")
    assert "backbone" in model.spec.adapters
    assert any("lora_A" in n for n, _ in model.backbone.named_parameters())
    data = train_script.dataset(4)
    out = model.generate([s.messages[:1] for s in data], [s.media for s in data], max_new_tokens=4)
    assert len(out) == 4
    kept = sorted(p.name for p in (reference / "tune" / "checkpoints").iterdir())
    assert kept == ["step-0000002", "step-0000004"]
    metrics = [json.loads(x) for x in (reference / "align" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 7)) and all("samples_per_s" in m and "lr" in m for m in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_merge_adapters_folds_lora_into_the_backbone(reference: Path, tmp_path: Path) -> None:
    from mmhub.adapters import merge_adapters

    model = MMModel.from_pretrained(reference / "tune" / "model")
    data = train_script.dataset(2)
    b = model.batch([s.messages for s in data], [s.media for s in data])
    before = model(b["input_ids"], b["attention_mask"], b["labels"], b["media"]).logits
    assert merge_adapters(model) == ["backbone"]
    assert not any("lora_" in n for n, _ in model.named_parameters())
    after = model(b["input_ids"], b["attention_mask"], b["labels"], b["media"]).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4), float((before - after).abs().max())
    model.save_pretrained(tmp_path / "merged")
    again = MMModel.from_pretrained(tmp_path / "merged")
    assert not again.spec.adapters and "backbone" in again.spec.trained or not again.backbone.has_weight_source()
    assert torch.allclose(again(b["input_ids"], b["attention_mask"], b["labels"], b["media"]).logits, after, atol=1e-6)


def test_run_folder_errors(tmp_path: Path) -> None:
    from mmhub.train.run import train

    spec = train_script.spec(4)
    data = train_script.dataset(8)
    spec["stages"] = spec["stages"][:1]
    spec["stages"][0]["max_steps"] = 1
    train(spec, out=tmp_path / "r", datasets={"align": data}, progress_bar=False)
    with pytest.raises(MMHubError, match="already holds a run; continue it with --resume"):
        train(spec, out=tmp_path / "r", datasets={"align": data}, progress_bar=False)
    # a finished run goes on with stages appended to its spec (the finished one is not retrained) ...
    longer = train_script.spec(4)
    longer["stages"] = [spec["stages"][0], {**spec["stages"][0], "name": "more"}]
    before = _params(tmp_path / "r", "align")
    summary = train(longer, resume=tmp_path / "r", datasets={"align": data, "more": data}, progress_bar=False)
    assert list(summary) == ["more"] and (tmp_path / "r" / "more" / "model").is_dir()
    assert all(torch.equal(v, _params(tmp_path / "r", "align")[k]) for k, v in before.items())
    stages = json.loads((tmp_path / "r" / "run_spec.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["align", "more"]
    # ... but not with any other change
    other = train_script.spec(4)
    other["stages"] = longer["stages"] + [{**spec["stages"][0], "name": "third"}]
    other["seed"] = 123
    with pytest.raises(MMHubError, match="in more than new stages at the end"):
        train(other, resume=tmp_path / "r", datasets={"align": data}, progress_bar=False)
    with pytest.raises(MMHubError, match="not an mmhub run folder"):
        train(resume=tmp_path / "nothing", datasets={"align": data})
    bad = train_script.spec(4)
    bad["stages"][0]["train"] = {"projectors": "frozen"}
    with pytest.raises(Exception, match="trains nothing"):
        train(bad, out=tmp_path / "b", datasets={"align": data})


def test_bad_samples_are_skipped_and_counted_then_the_run_stops(tmp_path: Path) -> None:
    from mmhub.errors import InputError
    from mmhub.train.run import train

    data = train_script.dataset(40)
    data[3].media = {"image": [str(tmp_path / "missing.png")]}  # a missing file
    (tmp_path / "broken.png").write_bytes(b"not a png")
    data[5].media = {"image": [str(tmp_path / "broken.png")]}  # a corrupt image
    spec = train_script.spec(8)
    spec["stages"] = spec["stages"][:1]
    spec["stages"][0].update(max_steps=5, max_bad_fraction=0.1)
    summary = train(spec, out=tmp_path / "ok", datasets={"align": data}, progress_bar=False)
    assert summary["align"]["skipped"] == 2 and summary["align"]["samples"] == 38
    spec["stages"][0]["max_bad_fraction"] = 0.01  # the pre-flight check stops it before the first step
    with pytest.raises(InputError, match=r"missing.png"):
        train(spec, out=tmp_path / "stop", datasets={"align": data}, progress_bar=False)
    assert not (tmp_path / "stop" / "align" / "checkpoints").exists()


def test_packed_training_matches_unpacked_and_group_by_length_runs(tmp_path: Path) -> None:
    from mmhub.train.run import train

    data = train_script.dataset(32)
    results = {}
    for name, extra in (("plain", {}), ("packed", {"pack": 256}), ("grouped", {"group_by_length": True})):
        spec = train_script.spec(8)
        spec["stages"] = spec["stages"][:1]
        spec["stages"][0].update(max_steps=3, save_every=None, **extra)
        train(spec, out=tmp_path / name, datasets={"align": data}, progress_bar=False)
        results[name] = _params(tmp_path / name, "align")
    a, b = results["plain"], results["packed"]
    diff = max(float((a[k] - b[k]).abs().max()) for k in a if "projectors" in k)
    assert diff < 1e-4, diff
    assert all(torch.isfinite(v).all() for v in results["grouped"].values())


def test_a_conversation_without_an_assistant_turn_is_skipped_with_a_warning(tmp_path: Path, capsys) -> None:
    from mmhub.data import Sample
    from mmhub.train.run import train

    data = train_script.dataset(16)
    data[2] = Sample("no-reply-7", data[2].messages[:1], data[2].media)  # a user turn only: nothing to learn
    spec = train_script.spec(8)
    spec["stages"] = spec["stages"][:1]
    spec["stages"][0].update(max_steps=2, save_every=None, max_bad_fraction=0.5)
    summary = train(spec, out=tmp_path / "r", datasets={"align": data}, progress_bar=False)
    assert summary["align"]["skipped_by_reason"] == {"no_assistant_turn": 1}
    out = capsys.readouterr().out
    assert "warning: skipped sample 2" in out and "'no-reply-7' has no assistant turn" in out
    assert "add the assistant" in out


def _logps(model, data):
    chosen = model.batch([s.conversation(s.chosen) for s in data], [s.media for s in data])
    rejected = model.batch([s.conversation(s.rejected) for s in data], [s.media for s in data])
    with torch.no_grad():
        c = model(chosen["input_ids"], chosen["attention_mask"], chosen["labels"], chosen["media"]).sequence_logprobs
        r = model(rejected["input_ids"], rejected["attention_mask"], rejected["labels"],
                  rejected["media"]).sequence_logprobs
    return c, r


def test_dpo_grows_the_chosen_over_rejected_margin(tmp_path: Path) -> None:
    from mmhub.data import Sample
    from mmhub.train.run import train

    prefs = []
    for s in train_script.dataset(32):
        colour = s.messages[1]["content"].split()[-1].rstrip(".")
        prefs.append(Sample(s.id, s.messages[:1], s.media, chosen=f"It is {colour}.", rejected=f"Ti si {colour}."))
    spec = train_script.spec(8)
    spec["stages"] = [{"name": "prefer", "objective": "dpo", "beta": 0.5, "lr": 5e-3, "batch_size": 8, "max_steps": 8,
                       "log_every": 1, "train": {"projectors": "full", "backbone": {"lora": {"r": 4}}}}]
    before = build(spec)
    c0, r0 = _logps(before, prefs)
    train(spec, out=tmp_path / "dpo", datasets={"prefer": prefs}, progress_bar=False)
    after = MMModel.from_pretrained(tmp_path / "dpo" / "prefer" / "model")
    c1, r1 = _logps(after, prefs)
    assert float(((c1 - r1) - (c0 - r0)).mean()) > 1.0  # the implicit reward margin grew
    assert float((c1 > r1).float().mean()) >= 0.9, "the chosen reply should out-rank the rejected one"
    metrics = (tmp_path / "dpo" / "prefer" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x) for x in metrics if '"loss"' in x]
    # step 1 is computed before any update: the reference equals the policy, every margin is 0, the loss ln 2
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-5 and steps[0]["reward_margin"] == pytest.approx(0, abs=1e-5)
    assert steps[-1]["reward_accuracy"] >= steps[0]["reward_accuracy"] and "reward_margin" in steps[-1]


def test_out_of_memory_and_precision_errors_name_the_fix(tmp_path: Path, monkeypatch) -> None:
    import mmhub.train.loop as loop
    from mmhub.train.run import train

    data = train_script.dataset(16)
    spec = train_script.spec(8)
    spec["stages"] = spec["stages"][:1]

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 123456789 bytes")

    monkeypatch.setattr(loop, "optimizer_step", oom)
    with pytest.raises(MMHubError, match=r"ran out of memory at step 1 \(batch_size 8.*"
                                         r"Lower batch_size and raise grad_accum"):
        train(spec, out=tmp_path / "oom", datasets={"align": data}, progress_bar=False)
    monkeypatch.undo()
    mixed = train_script.spec(8)
    mixed["stages"][1]["precision"] = "bf16"
    with pytest.raises(MMHubError, match="different precisions"):
        train(mixed, out=tmp_path / "mixed", datasets={"align": data, "tune": data})
    if not torch.cuda.is_available():
        half = train_script.spec(8)
        for st in half["stages"]:
            st["precision"] = "fp16"
        with pytest.raises(MMHubError, match="fp16 needs a CUDA GPU"):
            train(half, out=tmp_path / "half", datasets={"align": data, "tune": data})


def test_bf16_on_a_cpu_without_bf16_matmul_warns_and_names_the_fix(monkeypatch, caplog) -> None:
    import logging

    import mmhub.train.run as run

    spec = train_script.spec(8)
    for st in spec["stages"]:
        st["precision"] = "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(run, "_cpu_has_bf16_matmul", lambda: False)
    with caplog.at_level(logging.WARNING, logger="mmhub.train.run"):
        assert run._precision(spec, None) == "bf16"
    assert "without bf16 matrix instructions" in caplog.text and "precision: fp32" in caplog.text
    caplog.clear()
    monkeypatch.setattr(run, "_cpu_has_bf16_matmul", lambda: True)
    with caplog.at_level(logging.WARNING, logger="mmhub.train.run"):
        run._precision(spec, None)
    assert not caplog.text


def test_a_step_the_loss_scaler_skipped_does_not_advance_the_lr_schedule(tmp_path: Path, monkeypatch) -> None:
    """fp16 loss scaling skips the optimizer step when the scaled gradients overflow (on CUDA, typically the first
    steps at scale 65536); the LR schedule must not move past a step the optimizer never took."""
    from accelerate import Accelerator

    from mmhub.train.run import train

    skipped_steps = {1, 2, 5}
    calls = {"n": 0}

    def was_skipped(self) -> bool:  # asked once per optimizer step, after it
        calls["n"] += 1
        return calls["n"] in skipped_steps

    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(was_skipped))
    spec = train_script.spec(8)
    spec["stages"] = spec["stages"][:1]
    spec["stages"][0].update(save_every=1000)
    out = tmp_path / "run"
    train(spec, out=out, datasets={"align": train_script.dataset(16)}, progress_bar=False)
    steps = json.loads((out / "align" / "metrics.jsonl").read_text().splitlines()[-1])["summary"]["steps"]
    ckpt = sorted((out / "align" / "checkpoints").iterdir())[-1]
    sched = json.loads((ckpt / "scheduler.json").read_text())
    assert calls["n"] == steps, (calls, steps)
    assert sched["last_epoch"] == steps - len(skipped_steps), sched


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it (torchrun's workers may sit in sessions of their own)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.append((int(stat.parent.name), int(fields[1])))
    todo, doomed = [pid], []
    while todo:
        p = todo.pop()
        doomed.append(p)
        todo.extend(c for c, parent in children if parent == p)
    for p in doomed:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _two_nodes(out: Path, *extra: str) -> list[subprocess.Popen]:
    """The training script as two torchrun "nodes" (one process each) meeting through the c10d rendezvous on
    127.0.0.1: the launch line of a two-machine run, both ends on this one."""
    from live_server import free_port

    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mmhub",
                              "--node-rank", str(rank), str(SCRIPT), str(out), "4", *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
            for rank in (0, 1)]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [o for o, _ in outs]


def test_two_nodes_train_like_one_process_and_resume_after_sigkill(reference: Path, tmp_path: Path) -> None:
    """``torchrun --nnodes 2`` (c10d rendezvous): the two-node run matches the one-process run with the same global
    batch, and a two-node run killed mid-stage (SIGKILL to both nodes) resumes to the uninterrupted run's weights."""
    whole = tmp_path / "whole"
    _finish(_two_nodes(whole))
    for stage, tol in (("align", 1e-5), ("tune", 1e-4)):
        a, b = _params(reference, stage), _params(whole, stage)
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if "projectors" in k or "lora_" in k)
        assert diff < tol, f"{stage}: max |2 nodes - 1 process| = {diff}"
    cut = tmp_path / "cut"
    procs = _two_nodes(cut)
    target = cut / "align" / "checkpoints" / "step-0000002" / "progress.json"  # 4 align steps and tune still to go
    deadline = time.time() + 300
    while not target.exists() and all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.05)
    assert target.exists(), "the two-node run never wrote the mid-stage checkpoint"
    for p in procs:
        _kill_tree(p.pid)  # each node's agent and its worker
    for p in procs:
        p.communicate()
    assert not (cut / "align" / "model").exists(), "the kill came too late to test resuming mid-stage"
    out = _finish(_two_nodes(cut, "--resume"))
    assert any("resumed stage 'align'" in o for o in out)
    for stage in ("align", "tune"):
        a, b = _params(whole, stage), _params(cut, stage)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6), f"{stage}: {k} differs after the two-node resume"


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """An uninterrupted two-process run with the stages' slots sharded (FSDP2 on gloo): the projector in the
    alignment stage, the language model (with its LoRA) in the tuning stage."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    r = _run("-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT), str(out), "4", "--shard")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_sharded_training_matches_one_process(reference: Path, sharded_run: Path) -> None:
    """FSDP2 on two CPU processes (each holding half of the sharded slots) ends with the one-process weights for the
    same global batch; the checkpoints hold full tensors keyed by name."""
    for stage in ("align", "tune"):
        a, b = _params(reference, stage), _params(sharded_run, stage)
        assert a.keys() == b.keys()
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if "projectors" in k or "lora_" in k)
        assert diff < 1e-5, f"{stage}: max |sharded 2-process - 1-process| = {diff}"  # measured: 1.3e-7, 8.7e-7
    record = json.loads((sharded_run / "tune" / "checkpoints" / "step-0000002" / "progress.json").read_text())
    assert record["optimizer_keys"] == "names" and record["processes"] == 2 and record["per_step"] == 8


def test_sharded_run_resumes_after_sigkill_and_on_another_process_count(sharded_run: Path, tmp_path: Path) -> None:
    import shutil

    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT), str(cut), "4",
           "--shard"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    target = cut / "align" / "checkpoints" / "step-0000002" / "progress.json"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert target.exists(), "the sharded run never wrote the mid-stage checkpoint"
    _kill_tree(proc.pid)  # the launcher and both workers, at once
    proc.wait()
    time.sleep(0.5)
    assert not (cut / "align" / "model").exists(), "the kill came too late to test resuming mid-stage"
    r = _run("-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT), str(cut), "4", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed stage 'align'" in r.stdout
    for stage in ("align", "tune"):
        a, b = _params(sharded_run, stage), _params(cut, stage)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stage}: {k} differs after the sharded resume"
    # the same run resumed mid-tune on ONE process: 2 micro-batches of 4 keep its 8 samples a step
    one = tmp_path / "one"
    shutil.copytree(sharded_run, one)
    shutil.rmtree(one / "tune" / "model")
    shutil.rmtree(one / "tune" / "checkpoints" / "step-0000004")
    r = _run(str(SCRIPT), str(one), "4", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "grad_accum 1 -> 2 keeps the 8 samples per step" in r.stdout and "resumed stage 'tune'" in r.stdout
    a, b = _params(sharded_run, "tune"), _params(one, "tune")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), f"{k} differs after resuming on one process"


def test_placement_problems_are_named_before_anything_is_sharded() -> None:
    from mmhub.spec import StageSpec
    from mmhub.train.fsdp import placement_problems

    sys.path.insert(0, str(HERE))
    from conftest import TINY_SPEC

    spec = json.loads(json.dumps(TINY_SPEC))
    spec["backbone"]["config"] = {**spec["backbone"]["config"], "tie_word_embeddings": True}
    model = build(spec)
    stage = StageSpec(name="s", train={"projectors": "full", "backbone": "full"},
                      placement={"encoders.image": "shard", "backbone": "shard", "projectors.audio": "shard",
                                 "projectors.image": "shard"})
    problems = placement_problems(model, stage, {"encoders.image": "frozen", "backbone": "full",
                                                 "projectors.image": "full"})
    text = "\n".join(problems)
    assert len(problems) == 3, text
    assert "placement.encoders.image: encoders.image is frozen in this stage" in text
    assert "placement.backbone: backbone's input and output embeddings are tied" in text
    assert "placement.projectors.audio: no such slot" in text


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(reference: Path, tmp_path: Path) -> None:
    """A graceful stop (SIGTERM: what the web UI's Stop and a scheduler's pre-emption send) finishes the running step,
    writes its checkpoint and exits 0; resuming ends on the uninterrupted run's weights bit for bit."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out), "8"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    target = out / "align" / "checkpoints" / "step-0000002" / "progress.json"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert target.exists(), "the run never wrote the mid-stage checkpoint"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped in stage 'align' after step" in stdout and "mmhub train --resume" in stdout
    step = int(stdout.split("stopped in stage 'align' after step ")[1].split(";")[0])
    assert 2 <= step < 6 and (out / "align" / "checkpoints" / f"step-{step:07d}" / "progress.json").is_file()
    assert not (out / "align" / "model").exists()
    r = _run(str(SCRIPT), str(out), "8", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    for stage in ("align", "tune"):
        a, b = _params(reference, stage), _params(out, stage)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stage}: {k} differs after the graceful stop and resume"
    lines = [json.loads(x) for x in (out / "tune" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert all("grad_norm" in x and x["grad_norm"] > 0 and x["total"] == 4 for x in steps)


def test_a_run_does_not_depend_on_the_random_state_it_starts_in(tmp_path: Path) -> None:
    """Each stage seeds torch, numpy and random from the spec's seed as it starts, so dropout masks (and anything else
    drawn from the global generators) are the same whatever ran before in the process."""
    from mmhub.train.run import train

    data = train_script.dataset(16)
    results = []
    for outside in (1, 2):
        spec = train_script.spec(8)
        spec["stages"][0].update(max_steps=2, save_every=None)
        spec["stages"][1].update(max_steps=2, save_every=None,
                                 train={"projectors": "full", "backbone": {"lora": {"r": 4, "dropout": 0.3}}})
        torch.manual_seed(outside)  # what earlier work in the process left behind
        train(spec, out=tmp_path / str(outside), datasets={"align": data, "tune": data}, progress_bar=False)
        results.append(_params(tmp_path / str(outside), "tune"))
    a, b = results
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)
