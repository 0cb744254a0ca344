"""Reading spec documents without being hurt by them: size, encoding, nesting, alias expansion and breadth limits.

A spec is a few kilobytes of YAML or JSON written by a person. A file far past that (megabytes, thousands of
stages, hundreds of thousands of keys, nesting hundreds deep, YAML anchors that expand a billion-fold) is refused
before any slow work, with a message naming the limit and the number found. YAML is parsed with libyaml's loader
where it is installed (PyYAML's pure-Python one otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mmhub.errors import Problem, SpecError

MAX_BYTES = 1 << 20  # 1 MiB: a large real spec is ~10 KB
MAX_DEPTH = 32  # the deepest shipped preset nests 6 levels
MAX_VALUES = 100_000  # keys + list items + scalars after anchors/aliases expand
MAX_STAGES = 1_000
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _refuse(source: str, what: str, fix: str) -> SpecError:
    return SpecError([Problem("", what, fix)], source)


def read_text(path: Path) -> str:
    """A spec file's text: a regular file of at most `MAX_BYTES`, in UTF-8 (a BOM is named, not guessed at)."""
    source = str(path)
    if not path.is_file():
        raise _refuse(source, "is not a regular file", "give the path of a YAML or JSON spec file")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise _refuse(source, f"is {size:,} bytes; a spec may be at most {MAX_BYTES:,}",
                      "a spec names components and settings; keep data (word lists, weights) in files it points to")
    raw = path.read_bytes()[: MAX_BYTES + 1]
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise _refuse(source, "is UTF-16 text (it starts with a UTF-16 byte-order mark)", "save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _refuse(source, f"is not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x})",
                      "save the file as UTF-8") from None


def _flow_depth(text: str) -> int:
    """The deepest nesting of brackets and braces (quoted text is not skipped: an over-estimate is harmless)."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML/JSON text with the limits above; returns the document (not yet checked to be a mapping)."""
    if len(text) > MAX_BYTES:
        raise _refuse(source, f"is {len(text):,} characters; a spec may be at most {MAX_BYTES:,}", "shorten it")
    if "\x00" in text:
        raise _refuse(source, f"holds a NUL character at offset {text.index(chr(0))}", "save it as plain UTF-8 text")
    if _flow_depth(text) > MAX_DEPTH:
        raise _refuse(source, f"nests brackets {_flow_depth(text)} deep; a spec may nest at most {MAX_DEPTH}",
                      "flatten the document")
    try:
        data = yaml.load(text, Loader=_LOADER)  # noqa: S506  (a safe loader: plain data, no tags that build objects)
    except RecursionError:
        raise _refuse(source, f"nests deeper than mmhub reads (more than {MAX_DEPTH} levels)", "flatten the document") \
            from None
    check_tree(data, source)
    return data


def check_tree(data: Any, source: str) -> None:
    """Refuse a document that nests too deep, expands to too many values (YAML aliases count each time they are
    used) or lists too many stages."""
    count, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise _refuse(source, f"expands to more than {MAX_VALUES:,} values (YAML anchors and aliases count each "
                                  "time they are used)", "write the spec out plainly; a spec holds no data sets")
        if depth > MAX_DEPTH:
            raise _refuse(source, f"nests more than {MAX_DEPTH} levels deep", "flatten the document")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    stages = data.get("stages") if isinstance(data, dict) else None
    if isinstance(stages, list) and len(stages) > MAX_STAGES:
        raise _refuse(source, f"lists {len(stages):,} stages; a spec may have at most {MAX_STAGES:,}",
                      "split the training into several specs, or use fewer, longer stages")
