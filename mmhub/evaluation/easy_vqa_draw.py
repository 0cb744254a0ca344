"""easy-VQA drawing, end to end: "draw a red circle" -> the model's reply -> its generated image -> scored.

For models with an image generator (an output side). The fixed prompt set is every colour x shape
caption ("a red circle": 8 x 3 = 24) in ``wordings`` of `mmhub.data.easy_vqa.DRAW_PROMPTS` each
(the first N; ``limit`` takes the first prompts), generated greedily with the generator seeded by
the prompt's index. Scores:

* ``drawn``: the share of prompts for which the model emitted a signal group, so an image exists;
* ``color_match``: the image's dominant colour (the nearest palette colour of its non-background
  pixels, by majority; `mmhub.recipes.easyvqa_draw.dominant_color`) is the asked one;
* ``shape_recognised``: the shape classifier trained on easy-VQA images
  (`mmhub.evaluation.shape_classifier`) names the asked shape;
* ``accuracy``: both at once. A prompt without an image scores 0 on all three.

``blind`` is meaningless here (there is no input image) and is refused.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from mmhub.data.easy_vqa import COLORS, SHAPES, draw_prompt
from mmhub.errors import InputError
from mmhub.evaluation.base import EvalConfig, EvalTask


class DrawConfig(EvalConfig):
    wordings: int = 2  # request wordings per caption (DRAW_PROMPTS[0..N-1])
    steps: int | None = None  # the generator's sampling steps (default: its own setting)


def prompt_set(wordings: int) -> list[tuple[str, str, str]]:
    """(request, colour, shape) for every caption x wording, in a fixed order."""
    return [(draw_prompt(f"a {c} {s}", k), c, s) for k in range(wordings) for c in COLORS for s in SHAPES]


class EasyVQADrawTask(EvalTask):
    """Drawing easy-VQA shapes on request: colour match and shape recognition of the generated images."""

    name = "easy_vqa_draw"
    Config = DrawConfig
    modalities = ()

    def run(self, model: Any, *, split: str = "test", limit: int | None = None, blind: bool = False,
            batch_size: int = 16, max_new_tokens: int = 24,
            on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        from mmhub.evaluation.shape_classifier import load_classifier
        from mmhub.recipes.easyvqa_draw import dominant_color

        if blind:
            raise InputError("easy_vqa_draw has no input images, so --blind does not apply")
        if "image" not in getattr(model, "generators", {}):
            raise InputError("easy_vqa_draw needs a model with an image generator (output_projectors.image + "
                             "generators.image); this model generates text only")
        t0 = time.perf_counter()
        classifier = load_classifier()
        items = prompt_set(self.config.wordings)[:limit]
        n = drawn = colour_ok = shape_ok = both = 0
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            for j, (request, colour, shape) in enumerate(chunk):
                reply = model.generate([request], max_new_tokens=max_new_tokens, seed=start + j,
                                       media_steps=self.config.steps)[0]
                images = reply.images
                got_colour = dominant_color(images[0]) if images else None
                got_shape = classifier.classify(images[:1])[0] if images else None
                n += 1
                drawn += bool(images)
                colour_ok += got_colour == colour
                shape_ok += got_shape == shape
                both += got_colour == colour and got_shape == shape
                if on_result is not None:
                    on_result({"prompt": request, "reply": reply.text, "color": colour, "shape": shape,
                               "got_color": got_colour, "got_shape": got_shape})
        return {"task": self.name, "split": split, "n": n, "correct": both, "accuracy": both / n if n else 0.0,
                "drawn": drawn / n if n else 0.0, "color_match": colour_ok / n if n else 0.0,
                "shape_recognised": shape_ok / n if n else 0.0, "per_type": {}, "blind": False,
                "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                "seconds": round(time.perf_counter() - t0, 3)}
