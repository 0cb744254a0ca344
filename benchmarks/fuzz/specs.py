"""Fuzzed specs: the shipped presets mutated at random, and hostile spec files (encodings, depth, size, anchors).

Each case goes where a user's spec goes: the file is read by `load_spec`, validated by `plan_spec` (what
``mmhub validate`` does), and when that passes, assembled (``mmhub assemble``) and saved.
"""

from __future__ import annotations

import copy
import json
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

HUGE_INTS = (-320, -1, 0, 2**31, 2**63, 64_000_000, 10**12)


def presets() -> dict[str, dict[str, Any]]:
    """Every shipped tiny preset's spec dict, by name."""
    from mmhub.registry import get_registry

    return {p.key: p.spec for p in get_registry().presets.values() if p.size == "tiny"}


def _paths(tree: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, prefix + (i,))


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _replacement(rng: random.Random, old: Any) -> Any:
    if isinstance(old, bool) or not isinstance(old, int):
        choices: list[Callable[[], Any]] = [
            lambda: None, lambda: rng.choice(HUGE_INTS), lambda: "x" * rng.choice((0, 1, 100_000)),
            lambda: [old, old], lambda: {"type": old}, lambda: rng.random() * 1e9, lambda: not old,
            lambda: "\ud800 lone surrogate", lambda: {"nested": {"nested": {"nested": old}}}]
    else:  # integers get the sizes a hostile user tries first
        choices = [lambda: rng.choice(HUGE_INTS), lambda: -old, lambda: old * 1000, lambda: float(old) + 0.5,
                   lambda: str(old), lambda: None]
    return rng.choice(choices)()


def mutate(spec: dict[str, Any], rng: random.Random, n: int = 2) -> dict[str, Any]:
    """`spec` with `n` random edits: a value replaced, a key removed, renamed or added, a list grown."""
    out = copy.deepcopy(spec)
    for _ in range(n):
        paths = [p for p in _paths(out) if p]
        if not paths:
            break
        path = rng.choice(paths)
        parent, key = _get(out, path[:-1]), path[-1]
        op = rng.random()
        if op < 0.55:
            parent[key] = _replacement(rng, parent[key])
        elif op < 0.7 and isinstance(parent, dict):
            del parent[key]
        elif op < 0.8 and isinstance(parent, dict):
            parent[f"{key}_" if rng.random() < 0.5 else str(key)[:-1]] = parent.pop(key)
        elif op < 0.9 and isinstance(parent, dict):
            parent[rng.choice(("unknown", "trust_remote_code", "type", "hidden_size", "stages"))] = _replacement(rng, 1)
        elif isinstance(parent[key], list) and parent[key]:
            parent[key] = parent[key] * rng.choice((2, 50))
        else:
            parent[key] = _replacement(rng, parent[key])
    return out


def _nested_yaml(depth: int) -> bytes:
    return ("name: deep\nbackbone: " + "[" * depth + "]" * depth + "\n").encode()


def _anchor_bomb(levels: int = 9) -> bytes:
    lines = ['name: bomb', 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    lines.append(f"description: *a{levels - 1}")
    lines.append("backbone: {type: hf_causal_lm, config: {model_type: llama, hidden_size: 16, intermediate_size: 32, "
                 "num_hidden_layers: 1, num_attention_heads: 2, vocab_size: 300}, tokenizer: byte}")
    return "\n".join(lines).encode()


def hostile_files(base: dict[str, Any]) -> dict[str, bytes]:
    """Spec files built to hurt a parser or a validator, by name."""
    text = json.dumps(base)
    many_keys = dict(base, **{f"k{i}": i for i in range(300_000)})
    many_stages = dict(base, stages=[{"name": f"s{i}", "train": {"projectors": "full"}} for i in range(50_000)])
    return {
        "not_utf8": b"name: \xff\xfe\xfa\n" + text.encode(),
        "utf16": text.encode("utf-16"),
        "nested_1500": _nested_yaml(1500),
        "nested_100k": _nested_yaml(100_000),
        "300k_keys": json.dumps(many_keys).encode(),
        "50k_stages": json.dumps(many_stages).encode(),
        "anchor_bomb": _anchor_bomb(),
        "json_list": b"[1, 2, 3]",
        "empty": b"",
        "null_bytes": b"name: a\x00b\n",
        "missing_name_and_more": json.dumps({k: v for k, v in base.items() if k != "name"} | {"template": 5}).encode(),
        "huge_string": ("name: " + "x" * 3_000_000).encode(),
        "tab_indent": b"name: t\nbackbone:\n\ttype: x\n",
        "python_tag": b"name: !!python/object/apply:os.system ['touch /tmp/mmhub-fuzz-pwned']\n",
    }


def check_file(path: Path, assemble: bool) -> str:
    """What ``mmhub validate`` (and, with `assemble`, ``mmhub assemble`` plus a save) does with a spec file."""
    from mmhub.assembly import build_from_plan
    from mmhub.spec import load_spec
    from mmhub.validation import plan_spec

    plan = plan_spec(load_spec(path), source=str(path))
    if assemble:
        model = build_from_plan(plan)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(Path(tmp) / "m")
    return "valid"


def check_dict(spec: dict[str, Any], assemble: bool) -> str:
    """The same for a spec given as a dict, written to a temporary JSON file first (as a user's file would be)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.json"
        try:
            path.write_text(json.dumps(spec), encoding="utf-8", errors="surrogatepass")
        except (ValueError, TypeError):
            path.write_text(json.dumps(spec, ensure_ascii=True))
        return check_file(path, assemble)
