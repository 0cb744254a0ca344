"""The skill merge of docs/merging.md, held at its floor: two specialists of one base merged per slot by `mmhub merge`.

The three models ship in tests/assets/skills-merge (int8 with row scales, `mmhub export MODEL_FOLDER OUT --format
mmhub --dtype int8`; the encoder and the LLM come from their registry packages): the base (recipe `skills-base`: only
the projector trained, on captions), specialist A (`skills-shape-color-anchors`: a rank-8 LoRA on shape and colour
questions that keeps the base's hidden states on yes/no questions) and specialist B (`skills-yes-no-anchors`: a
rank-16 LoRA on balanced yes/no questions that keeps them on shape and colour questions). The best merge of the
measured table merges their backbones; the merged model is scored per question type on the first 450
`easy_vqa_balanced` test questions (strict: each yes/no question one whose answer the wording does not give), and
must keep both skills."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmhub.evaluation import evaluate
from mmhub.merge.config import MergeConfig
from mmhub.merge.run import merge
from mmhub.model import MMModel

from conftest import need_easy_vqa

ASSETS = Path(__file__).resolve().parent / "assets" / "skills-merge"
LIMIT = 450  # 70 shape, 63 colour, 317 balanced yes/no questions


def _models() -> dict[str, str]:
    models = {name: str(ASSETS / name) for name in ("base", "shape_color", "yes_no")}
    missing = [m for m in models.values() if not (Path(m) / "mmhub_spec.json").is_file()]
    assert not missing, f"{missing} missing: see docs/merging.md for the recipes and the export line"
    return models


def _score(path: Path) -> dict[str, float]:
    result = evaluate(MMModel.from_pretrained(path), "easy_vqa_balanced", limit=LIMIT, batch_size=50)
    assert result["n"] == LIMIT
    return {t: result["per_type"][t]["accuracy"] for t in ("shape", "color", "yes_no")}


# the best merge of docs/merging.md ("Specialists that keep the base's hidden states"): task arithmetic, weights chosen
# on the train split; the int8 folders merged score 100 / 95.2 / 98.4% (shape / colour / yes/no), as the float runs
BEST = {"method": "task_arithmetic", "weights": {"shape_color": 1.0, "yes_no": 1.0}}
# a few points under those; specialist A scores 3.2% on yes/no and B 34.3% on shape and 0% on colour, so the floors
# also hold the 20-point margins
FLOORS = {"shape": 0.95, "color": 0.90, "yes_no": 0.94}


@need_easy_vqa
@pytest.mark.slow
def test_the_best_skill_merge_keeps_both_skills(tmp_path: Path) -> None:
    cfg = MergeConfig(models=_models(), base="base", slots={"backbone": BEST})
    merged = merge(cfg, tmp_path / "merged")
    scores = _score(merged)
    assert all(scores[t] >= floor for t, floor in FLOORS.items()), scores
