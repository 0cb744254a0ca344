"""The out-of-tree example plugin: a real pip install, discovered through its entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "mmhub-example-plugin"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(PLUGIN)], check=True, timeout=300)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(target) + os.pathsep + env.get("PYTHONPATH", "")
    return env


SCRIPT = r"""
import json, numpy as np, torch
from PIL import Image
import mmhub
from mmhub.testing import check_component
spec = {"name": "with-plugin",
        "encoders": {"image": {"type": "patch_conv", "image_size": 32, "patch_size": 8, "width": 40}},
        "projectors": {"image": {"type": "pool_linear", "k": 3}},
        "backbone": {"type": "hf_causal_lm", "tokenizer": "byte", "config": {"model_type": "llama", "hidden_size": 32,
                     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 300}}}
model = mmhub.build(spec)
img = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
b = model.batch([[{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "ok"}]], [{"image": [img]}])
out = model(**b)
check_component("encoder", "patch_conv"); check_component("projector", "pool_linear")
print(json.dumps({"tokens": model.plan.tokens_per_item("image"), "loss": float(out.loss),
                  "plugin": mmhub.get_registry().get("encoder", "patch_conv").plugin}))
"""


def test_installed_plugin_is_discovered_and_builds(plugin_env) -> None:
    r = subprocess.run([sys.executable, "-m", "mmhub.cli", "plugins", "--json"], capture_output=True, text=True,
                       env=plugin_env, timeout=300)
    out = json.loads(r.stdout)
    enc = {e["name"]: e for e in out["encoders"]}
    proj = {e["name"]: e for e in out["projectors"]}
    assert enc["patch_conv"]["plugin"] == "example" and proj["pool_linear"]["plugin"] == "example"
    assert not out["failed"]
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=plugin_env, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["tokens"] == 6 and res["plugin"] == "example" and res["loss"] > 0  # 16 patches pooled by 3 -> 6


def test_allow_list_excludes_the_plugin(plugin_env) -> None:
    env = dict(plugin_env, MMHUB_PLUGINS="")
    r = subprocess.run([sys.executable, "-m", "mmhub.cli", "plugins", "--json"], capture_output=True, text=True,
                       env=env, timeout=300)
    out = json.loads(r.stdout)
    assert "patch_conv" not in {e["name"] for e in out["encoders"]} and "example" in out["disabled"]


def test_pypi_weight_source_finds_files_of_an_installed_distribution(plugin_env) -> None:
    code = ("from mmhub import weights; "
            "print(weights.resolve('pypi:mmhub-example-plugin==0.1.0/mmhub_example/__init__.py'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=plugin_env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).read_text().startswith('"""mmhub example plugin')
    code = "from mmhub import weights; weights.resolve('pypi:mmhub-example-plugin==9.9/x.bin')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=plugin_env, timeout=300)
    assert r.returncode != 0 and "mmhub weights fetch" in r.stderr
