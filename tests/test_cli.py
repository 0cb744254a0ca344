"""The `mmhub` command: plugins, presets, validate, assemble (run as a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmhub.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def test_plugins_json_lists_every_kind_and_plugin(tmp_path) -> None:
    env = {**os.environ, "MMHUB_HOME": str(tmp_path)}
    r = run("plugins", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("encoders", "projectors", "backbones", "output_projectors", "generators", "failed"):
        assert key in out
    names = {e["name"]: e for e in out["encoders"] + out["projectors"] + out["backbones"]}
    assert {"timm", "open_clip", "linear", "mlp", "hf_causal_lm"} <= set(names)
    assert names["mlp"]["plugin"] == "mmhub.projectors" and names["mlp"]["kind"] == "projector"
    assert "XFORMERS" not in r.stderr  # nothing imports xformers just to list plugins
    again = subprocess.run([sys.executable, "-c", NO_TORCH.format(argv=["plugins", "--json"])], capture_output=True,
                           text=True, env=env, timeout=300, check=False)
    assert again.returncode == 0, again.stderr  # the second listing answers from the cache, without torch
    assert json.loads(again.stdout.split("\nTORCH:")[0]) == out and "TORCH: False" in again.stdout


NO_TORCH = """
import sys
from mmhub.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("\\nTORCH:", "torch" in sys.modules)
"""


def test_help_does_not_import_torch_and_the_public_api_still_loads() -> None:
    r = subprocess.run([sys.executable, "-c", NO_TORCH.format(argv=["--help"])], capture_output=True, text=True,
                       timeout=300, check=False)
    assert "plugins" in r.stdout and "recipes" in r.stdout and "TORCH: False" in r.stdout, r.stdout + r.stderr
    import mmhub
    from mmhub.assembly import build
    from mmhub.model import MMModel

    assert mmhub.build is build and mmhub.MMModel is MMModel and set(mmhub.__all__) <= set(dir(mmhub))


def test_train_help_line_is_the_train_parsers_own() -> None:
    from mmhub.cli import parser

    def train_help(p) -> str:
        sub = next(a for a in p._actions if a.dest == "command")
        return next(a.help for a in sub._choices_actions if a.dest == "train")

    assert train_help(parser([])) == train_help(parser(["train"]))


def _isolated_registry(monkeypatch, tmp_path) -> None:
    """A fresh process-wide registry and listing cache for this test (restored afterwards)."""
    from mmhub import registry

    monkeypatch.setenv("MMHUB_HOME", str(tmp_path))
    monkeypatch.setattr(registry, "_registry", None)


def test_plugins_lists_a_name_clash_as_failed_and_exits_0(monkeypatch, tmp_path, capsys) -> None:
    import importlib.metadata as md
    import types

    from mmhub import hookimpl
    from mmhub.cli import main
    from mmhub.projectors.linear import LinearProjector

    class Mlp(LinearProjector):
        name = "mlp"

    module = types.ModuleType("clash_plugin")
    module.register_projectors = hookimpl(lambda register: register(Mlp))

    class FakeDist:
        name, version = "clash-dist", "1.0"

    class FakeEP:
        name, group, value, dist = "clash", "mmhub", "clash_plugin", FakeDist()

        def load(self):
            return module

    real = md.entry_points
    # only mmhub's group: other libraries (triton) list their own entry points through the same function
    monkeypatch.setattr(md, "entry_points",
                        lambda **kw: list(real(**kw)) + [FakeEP()] if kw.get("group") == "mmhub" else real(**kw))
    _isolated_registry(monkeypatch, tmp_path)
    assert main(["plugins", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    failed = {f["name"]: f for f in out["failed"]}
    assert failed["clash"]["dist"] == "clash-dist" and "distribution mmhub" in failed["clash"]["error"]
    assert next(e for e in out["projectors"] if e["name"] == "mlp")["plugin"] == "mmhub.projectors"
    assert main(["plugins"]) == 0 and "clash (clash-dist): projector 'mlp'" in capsys.readouterr().out


def test_listing_cache_is_rebuilt_when_the_allow_list_changes(monkeypatch, tmp_path) -> None:
    from mmhub.listing import cached_listing

    builds = []
    path = tmp_path / "listing.json"
    monkeypatch.delenv("MMHUB_PLUGINS", raising=False)
    for _ in range(2):
        assert cached_listing(lambda: builds.append(1) or {"n": len(builds)}, path) == {"n": 1}
    monkeypatch.setenv("MMHUB_PLUGINS", "")
    assert cached_listing(lambda: builds.append(1) or {"n": len(builds)}, path) == {"n": 2}


def test_plugins_show_gives_settings_types_defaults_plugin_and_distribution(capsys) -> None:
    from mmhub.cli import main

    assert main(["plugins", "show", "mlp", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    settings = {s["name"]: s for s in row["settings"]}
    assert row["kind"] == "projector" and row["plugin"] == "mmhub.projectors" and row["distribution"] == "mmhub"
    assert settings["depth"]["type"] == "int" and settings["depth"]["default"] == 2
    assert main(["plugins", "show", "mpl"]) == 2 and "did you mean 'mlp'" in capsys.readouterr().err.lower()


def test_recipes_lists_the_shipped_training_recipes(capsys) -> None:
    from mmhub.cli import main

    assert main(["recipes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"easyvqa-tiny", "easyvqa-smollm2"} <= set(rows) and rows["easyvqa-tiny"]["about"].startswith("The CI-sized")


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
    from mmhub.regimes import trainable_count
    from mmhub.spec import LoraRegime, LoraSpec

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
