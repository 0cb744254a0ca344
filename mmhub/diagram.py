"""A picture of an assembled model: each slot a box, token counts on the arrows, what trains coloured per stage.

`model_facts` collects what the picture shows (also what ``mmhub assemble`` prints): per slot its component type,
plugin, parameters and, per stage, its regime; per input modality the item size the encoder takes, the tokens it
emits and their width into the language model; injectors (drawn inside the backbone); the output side (signal
tokens -> output projector -> generator). `draw_diagram` renders it with matplotlib (Agg, server-side) as one panel
per stage, each box coloured by what that stage does to it (frozen, full, LoRA), to a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REGIME_COLOURS = {"frozen": "#d9dde3", "full": "#f6b26b", "lora": "#b4a7d6", "partial": "#a4c2f4"}


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _plugin(model: Any, slot: str) -> str:
    if slot == "signal_tokens":
        return "mmhub"
    if slot == "backbone":
        return model.plan.backbone.info.plugin
    head, name = slot.split(".", 1)
    return getattr(model.plan, head)[name].info.plugin


def _item_size(model: Any, modality: str) -> str:
    """The size of one item the encoder takes (an image's pixels), when it can tell."""
    enc = model.encoders[model.spec.encoder_owner(modality)] if hasattr(model.spec, "encoder_owner") else None
    transform = getattr(enc, "transform", None)
    if transform is None or modality not in ("image", "video"):
        return modality
    try:
        from PIL import Image

        shape = tuple(transform(Image.new("RGB", (224, 224))).shape)
        return f"{modality} {shape[-2]}x{shape[-1]}"
    except Exception:  # a transform that needs more than a picture: name the modality only
        return modality


def model_facts(model: Any) -> dict[str, Any]:
    """What the diagram and ``mmhub assemble`` show about `model` (JSON-serialisable)."""
    from mmhub.regimes import stage_table

    rows = model.parameter_table()
    for r in rows:
        r["plugin"] = _plugin(model, r["slot"])
    resolved = model.plan.resolved_dict()
    inputs = []
    for m in model.modalities:
        owner = model.spec.encoder_owner(m)
        proj = (resolved.get("projectors") or {}).get(m, {})
        enc = model.plan.encoder_facts[owner]
        emitted = (getattr(enc, "tokens_by_modality", None) or {}).get(m, enc.tokens_per_item)
        inputs.append({"modality": m, "encoder": f"encoders.{owner}", "projector": f"projectors.{m}",
                       "item": _item_size(model, m), "encoder_tokens": emitted, "tokens": model.plan.tokens_per_item(m),
                       "encoder_dim": proj.get("in_dim"), "llm_dim": proj.get("out_dim")})
    signals = getattr(model, "signal_tokens", None)
    outputs = [{"modality": m, "output_projector": f"output_projectors.{m}",
                "generator": f"generators.{m}" if m in getattr(model, "generators", {}) else None,
                "signal_tokens": int(signals.counts.get(m, 0)) if signals is not None else 0}
               for m in getattr(model, "output_projectors", {})]
    return {"name": model.spec.name, "components": rows, "total_params": sum(r["params"] for r in rows),
            "stages": stage_table(model), "template": model.plan.template.name,
            "tokens_per_item": {m: model.plan.tokens_per_item(m) for m in model.modalities},
            "inputs": inputs, "injectors": [f"injectors.{n}" for n in getattr(model, "injectors", {})],
            "outputs": outputs}


def diagram_caption(facts: dict[str, Any]) -> str:
    """The diagram in words (its caption and alt text): every slot with its component type and parameters, the
    token counts of each input path, the stages and what each trains."""
    rows = {r["slot"]: r for r in facts["components"]}
    named = ", ".join(f"{slot} {r['type']} ({_human(r['params'])})" for slot, r in rows.items())
    paths = "; ".join(f"{i['item']} -> {i['encoder_tokens']} -> {i['tokens']} tokens"
                      + (f" -> {i['llm_dim']}-d" if i.get("llm_dim") else "") for i in facts["inputs"])
    stages = "; ".join(f"{st['stage']} trains " + (", ".join(k for k, v in st["parts"].items() if v["trainable"])
                                                   or "nothing") for st in facts["stages"])
    return f"{facts['name']}: {named}." + (f" Inputs: {paths}." if paths else "") + \
        (f" Stages: {stages}." if stages else "")


def _regime(stage: dict[str, Any] | None, slot: str) -> str:
    if stage is None:
        return "frozen"
    label = str(stage["parts"].get(slot, {}).get("regime", "frozen"))
    return "lora" if label.startswith("lora") else label if label in REGIME_COLOURS else "partial"


def _box(ax: Any, x: float, y: float, w: float, h: float, text: str, colour: str) -> None:
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=colour, ec="#333333",
                                lw=1.2))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=7, family="DejaVu Sans")


def _arrow(ax: Any, x0: float, y0: float, x1: float, y1: float, label: str = "") -> None:
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops={"arrowstyle": "-|>", "color": "#333333", "lw": 1.1})
    if label:
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.12, label, ha="center", va="bottom", fontsize=6.5, color="#1f4e79")


def _slot_text(rows: dict[str, dict], slot: str, stage: dict[str, Any] | None) -> str:
    r = rows[slot]
    text = f"{slot}\n{r['type']}\n({r['plugin']})\n{_human(r['params'])} params"
    if stage is not None and slot in stage["parts"] and stage["parts"][slot]["trainable"]:
        text += f"\ntrains {_human(stage['parts'][slot]['trainable'])} ({stage['parts'][slot]['regime']})"
    return text


def _panel(ax: Any, facts: dict[str, Any], stage: dict[str, Any] | None) -> None:
    rows = {r["slot"]: r for r in facts["components"]}
    n_in, n_out = max(1, len(facts["inputs"])), len(facts["outputs"])
    height = max(n_in, n_out, 1) * 1.6 + (0.9 if facts["injectors"] else 0)
    w, h = 2.5, 1.25
    xs = {"input": 0.0, "encoder": 1.4, "projector": 5.2, "backbone": 9.0, "out_proj": 13.2, "generator": 17.0}
    drawn: dict[str, tuple[float, float]] = {}
    for i, inp in enumerate(facts["inputs"]):
        y = height - (i + 1) * 1.6 + 0.2
        ax.text(xs["input"] + 0.5, y + h / 2, inp["item"], ha="center", va="center", fontsize=7.5, style="italic")
        if inp["encoder"] not in drawn:
            _box(ax, xs["encoder"], y, w, h, _slot_text(rows, inp["encoder"], stage),
                 REGIME_COLOURS[_regime(stage, inp["encoder"])])
            drawn[inp["encoder"]] = (xs["encoder"], y)
        ex, ey = drawn[inp["encoder"]]
        _arrow(ax, xs["input"] + 1.05, y + h / 2, ex, ey + h / 2)
        _box(ax, xs["projector"], y, w, h, _slot_text(rows, inp["projector"], stage),
             REGIME_COLOURS[_regime(stage, inp["projector"])])
        dims = f"{inp['encoder_tokens']} x {inp['encoder_dim']}" if inp["encoder_dim"] else f"{inp['encoder_tokens']}"
        _arrow(ax, ex + w, ey + h / 2, xs["projector"], y + h / 2, dims)
        n = f"{inp['tokens']} token{'s' if inp['tokens'] != 1 else ''}"
        into = f"{n} x {inp['llm_dim']}-d" if inp["llm_dim"] else n
        _arrow(ax, xs["projector"] + w, y + h / 2, xs["backbone"], y + h / 2, into)
    bw = 3.0
    _box(ax, xs["backbone"], 0.1, bw, height - 0.2, "", REGIME_COLOURS[_regime(stage, "backbone")])
    ax.text(xs["backbone"] + bw / 2, height - 0.55, _slot_text(rows, "backbone", stage), ha="center", va="top",
            fontsize=7.5)
    for k, inj in enumerate(facts["injectors"]):
        _box(ax, xs["backbone"] + 0.2 + k * 1.0, 0.3, 0.9, 0.55, f"{inj.split('.', 1)[1]}\n{rows[inj]['type']}",
             REGIME_COLOURS[_regime(stage, inj)])
    for j, out in enumerate(facts["outputs"]):
        y = height - (j + 1) * 1.6 + 0.2
        _box(ax, xs["out_proj"], y, w, h, _slot_text(rows, out["output_projector"], stage),
             REGIME_COLOURS[_regime(stage, out["output_projector"])])
        _arrow(ax, xs["backbone"] + bw, y + h / 2, xs["out_proj"], y + h / 2, f"{out['signal_tokens']} signal tokens")
        if out["generator"]:
            _box(ax, xs["generator"], y, w, h, _slot_text(rows, out["generator"], stage),
                 REGIME_COLOURS[_regime(stage, out["generator"])])
            _arrow(ax, xs["out_proj"] + w, y + h / 2, xs["generator"], y + h / 2)
            ax.text(xs["generator"] + w + 0.2, y + h / 2, out["modality"], va="center", fontsize=7.5, style="italic")
    right = xs["generator"] + w + 1.2 if facts["outputs"] else xs["backbone"] + bw + 0.3
    ax.set_xlim(-0.2, right)
    ax.set_ylim(0, height)
    ax.axis("off")
    title = f"stage {stage['stage']!r}: trains {_human(stage['trainable'])}" if stage else "no training stages"
    ax.set_title(title, fontsize=9, loc="left")


def draw_diagram(facts: dict[str, Any], out: str | Path, stage: str | None = None) -> Path:
    """Render `facts` (`model_facts`) to a PNG at `out`: one panel per stage (or only `stage`), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from mmhub.atomic import write_bytes_atomic
    from mmhub.errors import MMHubError

    stages = facts["stages"] or [None]
    if stage is not None:
        stages = [s for s in facts["stages"] if s["stage"] == stage]
        if not stages:
            names = ", ".join(s["stage"] for s in facts["stages"]) or "none"
            raise MMHubError(f"--stage {stage!r}: the spec has no such stage (stages: {names})")
    rows_in = max(1, len(facts["inputs"]), len(facts["outputs"]))
    panel_h = rows_in * 1.1 + 1.0
    wide = 15.5 if facts["outputs"] else 10.5
    fig, axes = plt.subplots(len(stages), 1, figsize=(wide, panel_h * len(stages) + 0.8), squeeze=False)
    for ax, st in zip(axes[:, 0], stages, strict=True):
        _panel(ax, facts, st)
    fig.suptitle(f"{facts['name']}: {_human(facts['total_params'])} parameters, template {facts['template']}",
                 fontsize=11, x=0.01, ha="left")
    fig.legend(handles=[Patch(fc=c, ec="#333333", label=k) for k, c in REGIME_COLOURS.items()], loc="upper right",
               ncol=4, fontsize=7.5, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    out = Path(out)
    write_bytes_atomic(out, buf.getvalue())
    return out
