"""The one learning-rate schedule every trainer in moeconv uses: linear warm-up, then cosine decay."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.0, warmup_offset: int = 0) -> float:
    """Factor of the peak rate at `step` of `total`: (step + 1) / (warmup + warmup_offset) during the warm-up,
    then cosine from 1 down to `floor` over the remaining steps."""
    if step < warmup:
        return (step + 1) / (warmup + warmup_offset)
    # pi * (step - warmup) / span, in that order: the rounding every trainer has used since its first release
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
