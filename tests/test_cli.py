"""The `mmhub` command: plugins, presets, validate, assemble (run as a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmhub.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_plugins_json_lists_every_kind_and_plugin() -> None:
    r = run("plugins", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("encoders", "projectors", "backbones", "output_projectors", "generators", "failed"):
        assert key in out
    names = {e["name"]: e for e in out["encoders"] + out["projectors"] + out["backbones"]}
    assert {"timm", "open_clip", "linear", "mlp", "hf_causal_lm"} <= set(names)
    assert names["mlp"]["plugin"] == "mmhub.projectors" and names["mlp"]["kind"] == "projector"
    assert "XFORMERS" not in r.stderr  # nothing imports xformers just to list plugins


def test_validate_ok_and_every_problem(tmp_path, tiny_spec) -> None:
    r = run("validate", "llava-1.5:tiny")
    assert r.returncode == 0 and r.stdout.startswith("OK llava-1.5-tiny") and len(r.stdout.strip().splitlines()) == 1
    tiny_spec["projectors"]["image"]["out_dim"] = 1024
    tiny_spec["template"] = "vicunna"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_spec))
    r = run("validate", str(path))
    assert r.returncode == 2
    assert "2 problem(s)" in r.stderr and "projectors.image.out_dim: 1024 != backbone hidden size 48" in r.stderr
    assert "did you mean 'vicuna_v1'" in r.stderr and "Traceback" not in r.stderr


def test_assemble_json_reports_params_stages_tokens() -> None:
    r = run("assemble", "shikra:tiny", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    rows = {c["slot"]: c for c in out["components"]}
    assert rows["encoders.image"]["tokens_per_item"] == 16 and rows["projectors.image"]["params"] == 64 * 64 + 64
    stages = {s["stage"]: s for s in out["stages"]}
    assert stages["pretrain"]["trainable"] == rows["projectors.image"]["params"]
    lora = stages["instruct"]["parts"]["backbone"]
    assert lora["regime"] == "lora(r=8)" and lora["trainable"] > 0


def test_lora_count_matches_peft(registry) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    from mmhub import build
    from mmhub.spec import LoraSpec, LoraRegime
    from mmhub.stages import trainable_count

    model = build("llava:tiny")
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        regime = LoraRegime(lora=LoraSpec(r=4, target_modules=targets))
        want = trainable_count(model.backbone, regime)
        fresh = build("llava:tiny").backbone.model
        injected = inject_adapter_in_model(LoraConfig(r=4, target_modules=targets), fresh)
        got = sum(p.numel() for n, p in injected.named_parameters() if "lora_" in n)
        assert want == got, (targets, want, got)


def test_unknown_spec_exits_2_with_hint() -> None:
    r = run("assemble", "llava-1.6")
    assert r.returncode == 2 and "did you mean" in r.stderr and "llava" in r.stderr
