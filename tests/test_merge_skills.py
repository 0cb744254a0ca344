"""The skill merge of docs/merging.md, held at its floor: two specialists of one base merged per slot by `mmhub merge`.

The three models ship in tests/assets/skills-merge (int8 with row scales, `mmhub export RUN OUT --format mmhub
--dtype int8`; the encoder and the LLM come from their registry packages): the base (recipe `skills-base`: only the
projector trained, on captions), specialist A (`skills-shape-color`: + a rank-8 LoRA on shape and colour questions)
and specialist B (`skills-yes-no-easyvqa`: + a rank-8 LoRA on yes/no questions). The best method of the measured
table merges their backbones; the merged model is scored per question type on the test split's first 450
questions (strict), and must keep both skills.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mmhub.evaluation import evaluate
from mmhub.merge.config import MergeConfig
from mmhub.merge.run import merge
from mmhub.model import MMModel

from conftest import need_easy_vqa

ASSETS = Path(__file__).resolve().parent / "assets" / "skills-merge"
LIMIT = 450  # 70 shape, 63 colour, 317 yes/no questions


def _models() -> dict[str, str]:
    models = {name: str(ASSETS / name) for name in ("base", "shape_color", "yes_no")}
    missing = [m for m in models.values() if not (Path(m) / "mmhub_spec.json").is_file()]
    assert not missing, f"{missing} missing: see docs/merging.md for the recipes and the export line"
    return models


def _score(path: Path) -> dict[str, float]:
    result = evaluate(MMModel.from_pretrained(path), "easy_vqa", limit=LIMIT, batch_size=50)
    assert result["n"] == LIMIT
    return {t: result["per_type"][t]["accuracy"] for t in ("shape", "color", "yes_no")}


# the best method of docs/merging.md's table, weights chosen on the train split (`search:`, keep_skills)
BEST = {"method": "ties", "weights": {"shape_color": 1.0, "yes_no": 1.5}, "density": 0.7}
# a few points under what the merged shipped folders score (docs/merging.md: shape 97.1%, colour 82.5%, yes/no 65.6%
# from the run folders; the int8 folders score the same, merged in 110 s); specialist A scores 0% on yes/no and B 0% on
# shape and colour, so the floors also hold the 20-point margins
FLOORS = {"shape": 0.93, "color": 0.77, "yes_no": 0.60}


@need_easy_vqa
@pytest.mark.slow
def test_the_best_skill_merge_keeps_both_skills(tmp_path: Path) -> None:
    cfg = MergeConfig(models=_models(), base="base", slots={"backbone": BEST})
    merged = merge(cfg, tmp_path / "merged")
    scores = _score(merged)
    assert all(scores[t] >= floor for t, floor in FLOORS.items()), scores
