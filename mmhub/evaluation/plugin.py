"""The built-in evaluation tasks, registered through the same hook as any plugin's.

Each is registered by reference (``module:Class``) under its name; a task's module loads when it is used.
"""

from __future__ import annotations

from mmhub.hookspecs import hookimpl

EVAL_TASKS = (
    ("easy_vqa", "mmhub.evaluation.easy_vqa:EasyVQATask"),
    ("easy_vqa_balanced", "mmhub.evaluation.easy_vqa:EasyVQABalancedTask"),
    ("easy_vqa_draw", "mmhub.evaluation.easy_vqa_draw:EasyVQADrawTask"),
    ("easy_vqa_reworded", "mmhub.evaluation.reworded:EasyVQARewordedTask"),
    ("easy_vqa_followup", "mmhub.evaluation.followup:EasyVQAFollowupTask"),
    ("photo_refusal", "mmhub.evaluation.photo_refusal:PhotoRefusalTask"),
)


@hookimpl
def register_eval_tasks(register):
    for name, ref in EVAL_TASKS:
        register(ref, name=name)
