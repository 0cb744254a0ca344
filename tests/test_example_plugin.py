"""The out-of-tree example plugin: a real pip install, discovered through its entry point; its preset builds,
its own tests pass with mmhub's tester classes; and a plugin encoder whose describe() lies is caught at build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmhub import hookimpl
from mmhub.assembly import build
from mmhub.errors import SpecError
from mmhub.interfaces import Encoder, EncoderFacts
from mmhub.registry import build_registry

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
spec = {"name": "with-plugin",
        "encoders": {"image": {"type": "patch_conv", "image_size": 32, "patch_size": 8, "width": 40}},
        "projectors": {"image": {"type": "pool_linear", "k": 3}},
        "backbone": {"type": "hf_causal_lm", "tokenizer": "byte", "config": {"model_type": "llama", "hidden_size": 32,
                     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 300}}}
model = mmhub.build(spec)
img = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
b = model.batch([[{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "ok"}]], [{"image": [img]}])
out = model(**b)
preset = mmhub.build("patch-conv-llama:tiny")
b = preset.batch([[{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "ok"}]], [{"image": [img]}])
print(json.dumps({"tokens": model.plan.tokens_per_item("image"), "loss": float(out.loss),
                  "plugin": mmhub.get_registry().get("encoder", "patch_conv").plugin,
                  "preset_tokens": preset.plan.tokens_per_item("image"), "preset_loss": float(preset(**b).loss),
                  "preset_plugin": mmhub.get_registry().preset("patch-conv-llama:tiny").plugin}))
"""


def test_installed_plugin_is_discovered_and_builds(plugin_env) -> None:
    r = subprocess.run([sys.executable, "-m", "mmhub.cli", "plugins", "--json"], check=False, capture_output=True,
                       text=True,
                       env=plugin_env, timeout=300)
    out = json.loads(r.stdout)
    enc = {e["name"]: e for e in out["encoders"]}
    proj = {e["name"]: e for e in out["projectors"]}
    assert enc["patch_conv"]["plugin"] == "example" and proj["pool_linear"]["plugin"] == "example"
    assert not out["failed"]
    r = subprocess.run([sys.executable, "-c", SCRIPT], check=False, capture_output=True, text=True, env=plugin_env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["tokens"] == 6 and res["plugin"] == "example" and res["loss"] > 0  # 16 patches pooled by 3 -> 6
    assert res["preset_tokens"] == 8 and res["preset_plugin"] == "example" and res["preset_loss"] > 0  # 16 by 2


def test_the_plugins_own_tests_pass_with_the_tester_classes() -> None:
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
                        str(PLUGIN / "tests")], check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "16 passed" in r.stdout, r.stdout[-1000:]


def test_allow_list_excludes_the_plugin(plugin_env) -> None:
    env = dict(plugin_env, MMHUB_PLUGINS="")
    r = subprocess.run([sys.executable, "-m", "mmhub.cli", "plugins", "--json"], check=False, capture_output=True,
                       text=True,
                       env=env, timeout=300)
    out = json.loads(r.stdout)
    assert "patch_conv" not in {e["name"] for e in out["encoders"]} and "example" in out["disabled"]


def test_pypi_weight_source_finds_files_of_an_installed_distribution(plugin_env) -> None:
    code = ("from mmhub import weights; "
            "print(weights.resolve('pypi:mmhub-example-plugin==0.1.0/mmhub_example/__init__.py'))")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=plugin_env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).read_text().startswith('"""mmhub example plugin')
    code = "from mmhub import weights; weights.resolve('pypi:mmhub-example-plugin==9.9/x.bin')"
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=plugin_env,
                       timeout=300)
    assert r.returncode != 0 and "mmhub weights fetch" in r.stderr


class WideEncoder(Encoder):
    """Test double: describes 16 features per token but emits 24."""

    name = "test_wide_patch"
    modalities_in = ("image",)
    out_dim_doc, tokens_doc = "16 (wrongly)", "4"

    @classmethod
    def describe(cls, config, ctx) -> EncoderFacts:
        return EncoderFacts(out_dim=16, tokens_per_item=4)

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.proj = torch.nn.Linear(3, 24)

    out_dim = property(lambda self: 16)  # agrees with describe(); the forward does not

    def preprocess(self, item, modality: str) -> torch.Tensor:
        return torch.zeros(4, 3)

    def forward(self, pixels: torch.Tensor, modality: str) -> torch.Tensor:
        return self.proj(pixels)


class WidePlugin:
    @hookimpl
    def register_encoders(self, register):
        register(WideEncoder)


def test_an_encoder_that_emits_other_than_it_describes_is_caught_at_build(tiny_spec) -> None:
    reg = build_registry(extra=[("wide", WidePlugin())])
    tiny_spec["encoders"]["image"] = {"type": "test_wide_patch"}
    with pytest.raises(SpecError) as exc:
        build(tiny_spec, registry=reg)
    text = str(exc.value)
    assert "encoders.image" in text and "'test_wide_patch'" in text and "plugin wide" in text
    assert "4 tokens of width 16" in text and "4 tokens of width 24" in text and "describe()" in text
