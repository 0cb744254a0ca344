"""The importer framework: family choice from config.json, refusals that name the problem, strict weight maps, and
a third-party importer plugin written from docs/importers.md, installed outside the tree and checked for parity."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmhub.cli import main
from mmhub.errors import CheckpointError, MMHubError
from mmhub.importers import Checkpoint, Imported, Importer, import_checkpoint, load_strict
from mmhub.loading import load

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "importers.md"


def fake_folder(folder: Path, config: dict, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_an_unsupported_model_type_exits_2_listing_the_families(tmp_path, capsys) -> None:
    folder = fake_folder(tmp_path / "bert", {"model_type": "bert"}, {"w": torch.zeros(2)})
    assert main(["import", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no importer for model_type 'bert'" in err and "llava" in err and "register_importers" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_auto_map_is_refused_unless_the_caller_trusts_remote_code(tmp_path) -> None:
    folder = fake_folder(tmp_path / "remote", {"model_type": "llava", "auto_map": {"AutoModel": "modeling_x.X"}},
                         {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="auto_map .*AutoModel.* pass trust_remote_code=True"):
        import_checkpoint(folder)
    with pytest.raises(MMHubError) as err:  # trusted: it gets past the refusal to the importer itself
        import_checkpoint(folder, trust_remote_code=True)
    assert "trust_remote_code" not in str(err.value)


def test_pickled_weights_are_refused_by_name(tmp_path) -> None:
    folder = fake_folder(tmp_path / "pickled", {"model_type": "llava"})
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickles, which mmhub never loads"):
        Checkpoint(folder).keys()


def test_strict_loading_names_the_tensor_and_both_shapes_and_lists_missing_and_unexpected() -> None:
    module = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match=r"weight: checkpoint \(2, 4\) vs model \(2, 3\)"):
        load_strict(module, {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, "here")
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\) \(bias\) and 1 unexpected \(extra\)"):
        load_strict(module, {"weight": torch.zeros(2, 3), "extra": torch.zeros(1)}, "here")
    tied = torch.nn.Module()
    tied.a, tied.b = torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False)
    tied.b.weight = tied.a.weight
    load_strict(tied, {"a.weight": torch.ones(2, 2)}, "tied")  # a tied parameter counts as loaded
    assert torch.equal(tied.b.weight, torch.ones(2, 2))


class HalfImporter(Importer):
    """Takes one of the checkpoint's two tensors and forgets the other."""

    name = "half"
    model_types = ("half-test",)

    def convert(self, ckpt, options):
        w = ckpt.take("proj.")
        spec = {"name": "half", "backbone": {"type": "hf_causal_lm", "tokenizer": "byte",
                                             "config": {"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2,
                                                        "vocab_size": 300, "n_positions": 16}}}
        return Imported(spec=spec, weights={"projectors.image": w})


def test_tensors_no_part_took_are_listed(tmp_path) -> None:
    import types

    from mmhub import hookimpl
    from mmhub.registry import build_registry

    plugin = types.SimpleNamespace(register_importers=hookimpl(lambda register: register(HalfImporter)))
    registry = build_registry(extra=[("half", plugin)], entry_points=False)
    folder = fake_folder(tmp_path / "half", {"model_type": "half-test"},
                         {"proj.weight": torch.zeros(2, 2), "forgotten.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"left 1 checkpoint tensor\(s\) unused \(forgotten.weight\)"):
        import_checkpoint(folder, registry=registry)


def test_an_hf_id_missing_from_the_cache_gives_the_download_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MMHubError, match=r"`huggingface-cli download llava-hf/llava-1.5-7b-hf --revision v2`"):
        load("hf:llava-hf/llava-1.5-7b-hf@v2")
    with pytest.raises(MMHubError, match=r"`huggingface-cli download llava-hf/llava-1.5-7b-hf`"):
        load("hf:llava-hf/llava-1.5-7b-hf")


# -- a third-party importer, exactly as docs/importers.md writes it --------------------------------------------
def doc_files() -> dict[str, str]:
    """The files docs/importers.md spells out (fenced blocks with a title="PATH")."""
    return dict(re.findall(r'```\w+ title="([^"]+)"\n(.*?)```', DOC.read_text(), re.S))


PARITY = r"""
import json, sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
from mmhub.backbones.byte_tokenizer import byte_tokenizer
import mmhub
folder = sys.argv[1]
torch.manual_seed(0)
hf = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300, n_positions=64,
                                bos_token_id=256, eos_token_id=257)).eval()
with torch.no_grad():
    for p in hf.parameters():
        p.normal_(0, 0.2)
hf.save_pretrained(folder)
byte_tokenizer().save_pretrained(folder)
model = mmhub.load(folder)
b = model.batch([[{"role": "user", "content": "a cat on a mat"}, {"role": "assistant", "content": "yes"}]], [{}])
with torch.no_grad():
    ours = model(**b).logits
    theirs = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
print(json.dumps({"importer": model.imported_from["importer"], "diff": float((ours - theirs).abs().max()),
                  "listed": "gpt2_text" in mmhub.get_registry().entries["importer"]}))
"""


def test_a_third_party_importer_from_the_docs_installs_and_matches_transformers(tmp_path) -> None:
    files = doc_files()
    assert set(files) == {"pyproject.toml", "mmhub_gpt2_importer/__init__.py"}, set(files)
    package = tmp_path / "pkg"
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(package)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MMHUB_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-c", PARITY, str(tmp_path / "gpt2")], capture_output=True, text=True,
                       env=env, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["importer"] == "gpt2_text" and out["listed"]
    assert out["diff"] <= 1e-5, out
