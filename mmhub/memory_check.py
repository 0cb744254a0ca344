"""Refuse, while validating, a spec whose parameters alone cannot fit in the memory this machine has available.

Each planned component is asked for `Component.memory_estimate` (bytes of its parameters and buffers, known
before building: by default the component built on PyTorch's ``meta`` device, which allocates nothing). The
estimates are summed and compared with ``MemAvailable``; over it, validation reports one problem at the biggest
component with both numbers and the fixes. A component whose estimate is unknown (its constructor reads weight
files, or cannot run on ``meta``) counts as 0, so the check never refuses a spec it cannot size.
``MMHUB_SKIP_MEMORY_CHECK=1`` turns the check off.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmhub.errors import Problem


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (``MemAvailable`` of /proc/meminfo), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def estimates(plan: Any) -> list[tuple[Any, int | None]]:
    """(slot, estimated bytes or None) for every planned component, shared encoders once."""
    slots = [plan.backbone, *(s for m, s in plan.encoders.items() if m not in plan.shared),
             *plan.projectors.values(), *plan.injectors.values(), *plan.output_projectors.values(),
             *plan.generators.values()]
    return [(s, s.info.cls.memory_estimate(s.config, plan.ctx)) for s in slots if s is not None]


def check_memory(plan: Any, problems: list[Problem]) -> None:
    """Add a problem when the plan's parameter bytes exceed the memory available (see the module docstring)."""
    if os.environ.get("MMHUB_SKIP_MEMORY_CHECK") == "1" or plan.backbone is None:
        return
    sized = [(s, b) for s, b in estimates(plan) if b]
    total = sum(b for _, b in sized)
    free = available_memory()
    if free is None or not sized or total <= free:
        return
    biggest, size = max(sized, key=lambda x: x[1])
    problems.append(Problem(biggest.path, f"building this spec needs about {total / 2**30:.1f} GiB for its "
                                          f"parameters alone ({biggest.info.name}: {size / 2**30:.1f} GiB), but this "
                                          f"machine has {free / 2**30:.1f} GiB of memory available",
                            "choose a smaller config, dtype bfloat16/float16, or quantize: nf4; or free memory "
                            "(MMHUB_SKIP_MEMORY_CHECK=1 builds anyway)"))
