"""The built-in evaluation tasks, registered through the same hook as any plugin's."""

from __future__ import annotations

from mmhub.hookspecs import hookimpl


@hookimpl
def register_eval_tasks(register):
    from mmhub.evaluation.easy_vqa import EasyVQATask
    from mmhub.evaluation.easy_vqa_draw import EasyVQADrawTask
    from mmhub.evaluation.followup import EasyVQAFollowupTask
    from mmhub.evaluation.photo_refusal import PhotoRefusalTask
    from mmhub.evaluation.reworded import EasyVQARewordedTask

    register(EasyVQATask)
    register(EasyVQADrawTask)
    register(EasyVQARewordedTask)
    register(EasyVQAFollowupTask)
    register(PhotoRefusalTask)
