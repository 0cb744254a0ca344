"""Training MM-LLMs in stages (alignment, instruction tuning, preference tuning) on Hugging Face accelerate."""

from mmhub.train.trainable import apply_stage, param_groups

__all__ = ["apply_stage", "param_groups"]
