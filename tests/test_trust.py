"""Running code shipped with weights is the caller's decision: a spec or model folder can never ask for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mmhub
from mmhub.errors import MMHubError, SpecError
from mmhub.spec import load_spec
from mmhub.validation import plan_spec


def _folder_with_code(where: Path) -> tuple[Path, Path]:
    """A transformers folder whose config names Python in the folder (auto_map) that writes a marker file."""
    folder, marker = where / "hf", where / "RAN"
    folder.mkdir()
    (folder / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig\n\n\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 300}))
    return folder, marker


def _spec(folder: Path, trust: bool | None) -> dict:
    backbone = {"type": "hf_causal_lm", "source": str(folder), "tokenizer": "byte"}
    if trust is not None:
        backbone["trust_remote_code"] = trust
    return {"name": "evil", "backbone": backbone}


def test_a_spec_cannot_switch_remote_code_on(tmp_path) -> None:
    folder, marker = _folder_with_code(tmp_path)
    with pytest.raises(SpecError, match="trust_remote_code cannot be set in a spec"):
        plan_spec(load_spec(_spec(folder, True)))
    assert not marker.exists()


def test_a_saved_folder_cannot_switch_remote_code_on(tmp_path, tiny_spec) -> None:
    mmhub.build(tiny_spec).save_pretrained(tmp_path / "m")
    spec_file = tmp_path / "m" / "mmhub_spec.json"
    data = json.loads(spec_file.read_text())
    data["backbone"]["trust_remote_code"] = True
    spec_file.write_text(json.dumps(data))
    with pytest.raises(MMHubError, match="trust_remote_code cannot be set"):
        mmhub.load(tmp_path / "m", verify=False)
    cli = subprocess.run([sys.executable, "-m", "mmhub.cli", "validate", str(tmp_path / "m")], capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 2 and "trust_remote_code cannot be set" in cli.stdout + cli.stderr


def test_without_the_callers_consent_the_folders_code_never_runs(tmp_path) -> None:
    folder, marker = _folder_with_code(tmp_path)
    with pytest.raises(SpecError):  # transformers refuses the auto_map without trust
        plan_spec(load_spec(_spec(folder, None)))
    assert not marker.exists()


def test_the_caller_can_allow_it(tmp_path) -> None:
    folder, marker = _folder_with_code(tmp_path)
    try:
        plan_spec(load_spec(_spec(folder, None)), trust_remote_code=True)
    except SpecError:
        pass  # the toy config builds no model; what matters is that the caller's consent reached transformers
    assert marker.read_text() == "ran"
