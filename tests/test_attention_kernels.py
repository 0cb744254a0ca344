"""Which attention kernel ran (`attention_kernels`), xformers counted only with its C++/CUDA extensions loaded,
xformers' own import warning replaced by one mmhub line, and benchmarks/xformers_check.py refusing a CPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmhub.attention as attn
from mmhub.attention import AttentionBackendError, attention, select_backend

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")  # a device object only: nothing runs on it
MISMATCHED = dict(installed=True, version="0.0.35", kernels=False, built_for="2.10.0+cu128", torch="2.14.1+cu130",
                  reason="built for PyTorch 2.10.0+cu128")


def qkv(Lq: int = 5, Lk: int = 7) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 3, L, 8, generator=g) for L in (Lq, Lk, Lk))


def test_the_report_counts_the_kernel_that_ran() -> None:
    q, k, v = qkv()
    with attn.attention_kernels() as ran:
        attention(q, k, v, None, "auto")  # CPU: SDPA
        attention(q, k, v, None, "sdpa")
        attention(q, k, v, None, "eager")
    assert dict(ran) == {"sdpa": 2, "eager": 1}
    with attn.attention_kernels() as again:  # a fresh count per block; nothing counted outside one
        pass
    assert dict(again) == {}


def test_auto_reports_sdpa_when_xformers_had_no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_kernel(*args: object, **kwargs: object) -> torch.Tensor:
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    monkeypatch.setattr(attn, "xformers_runs", lambda device: True)
    monkeypatch.setattr(attn, "_xformers", no_kernel)
    monkeypatch.setattr(attn, "_xformers_unsupported", set())
    with attn.attention_kernels() as ran:
        attention(*qkv(), None, "auto")
    assert dict(ran) == {"sdpa": 1}  # chosen xformers, ran SDPA: the report says what ran


def test_xformers_without_its_extensions_never_counts_as_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """An xformers that imports but whose C++/CUDA extensions did not load (built for another torch) is not a
    backend: `auto` takes SDPA on CUDA, an explicit `xformers` names the build, this torch and the fix."""
    mismatched = attn.XformersStatus(**MISMATCHED)
    monkeypatch.setattr(attn, "xformers_status", lambda: mismatched)
    assert not attn.xformers_runs(CUDA)
    assert select_backend("auto", CUDA) == "sdpa"
    with pytest.raises(AttentionBackendError) as info:
        select_backend("xformers", CUDA)
    msg = str(info.value)
    assert "2.10.0+cu128" in msg and "2.14.1+cu130" in msg and "make install XFORMERS=1" in msg
    assert mismatched.line().count("\n") == 0 and "make install XFORMERS=1" in mismatched.line()
    ok = attn.XformersStatus(installed=True, version="0.0.35", kernels=True, built_for="2.10.0+cu128",
                        torch="2.10.0+cu128", reason="")
    monkeypatch.setattr(attn, "xformers_status", lambda: ok)
    assert attn.xformers_runs(CUDA) and select_backend("auto", CUDA) == "xformers"
    assert not attn.xformers_runs(torch.device("cpu"))


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, **env})


def test_import_mmhub_silences_xformers_import_warning() -> None:
    """After `import mmhub`, importing xformers (as diffusers does) prints nothing of xformers' own warning."""
    r = _python("import mmhub, importlib.util\n"
                "if importlib.util.find_spec('xformers'):\n    import xformers.ops\n"
                "import diffusers.models.attention_processor\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "WARNING[XFORMERS]" not in r.stderr and "xFormers can't load" not in r.stderr, r.stderr[-2000:]


def test_xformers_status_is_one_logged_line() -> None:
    r = _python("import logging, sys\n"
                "logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='%(levelname)s %(message)s')\n"
                "import mmhub\nfrom mmhub.attention import xformers_status\n"
                "s = xformers_status(); xformers_status(); import diffusers.models.attention_processor\n"
                "print(s.usable, s.kernels)\n")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if "xformers" in line.lower()]
    assert len(lines) == 1 and "attention: xformers" in lines[0], r.stderr[-2000:]
    if r.stdout.split() == ["False", "False"] and "not installed" not in lines[0]:  # here: a build for another torch
        assert "built for" in lines[0] and torch.__version__ in lines[0] and "make install XFORMERS=1" in lines[0]


def test_xformers_check_refuses_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.xformers_check", "--out", str(out)], capture_output=True,
                       text=True, cwd=ROOT, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-1000:])
    assert "needs a CUDA GPU" in r.stderr and "torch.cuda.is_available() is False" in r.stderr, r.stderr[-1000:]
    assert not out.exists()
