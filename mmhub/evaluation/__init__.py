"""Evaluation: tasks as plugins (``register_eval_tasks``), exact-match scoring, and the runner behind ``mmhub eval``.

    from mmhub.evaluation import evaluate
    evaluate(model, "easy_vqa", split="test", limit=500, blind=False)   # {"accuracy": ..., "per_type": ...}
"""

from mmhub.evaluation.base import EvalConfig, EvalTask, exact_match, normalize_answer, score
from mmhub.evaluation.runner import evaluate, get_task

__all__ = ["EvalTask", "EvalConfig", "normalize_answer", "exact_match", "score", "evaluate", "get_task"]
