"""The one learning-rate schedule reproduces, bit for bit, each trainer's own formula from before it was shared."""

from __future__ import annotations

import math
import random

from moeconv.schedule import warmup_cosine


def test_schedule_matches_the_router_dot_and_dag_formulas_exactly():
    rng = random.Random(0)
    for _ in range(20000):
        total, peak = rng.randint(1, 500), rng.random() * 10 ** rng.uniform(-5, 0)
        step, w = rng.randint(0, total), rng.randint(0, total)
        cosine = 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))
        assert 0.5 * peak * (1 + math.cos(math.pi * step / max(1, total))) == peak * warmup_cosine(step, total, 0)  # router
        if w:
            assert ((step + 1) / w if step < w else cosine) == warmup_cosine(step, total, w)  # dot
        assert ((step + 1) / (w + 1) if step < w else cosine) == warmup_cosine(step, total, w, warmup_offset=1)  # dag


def test_schedule_shape():
    factors = [warmup_cosine(s, 100, 10, floor=0.1) for s in range(101)]
    assert factors[9] == 1.0 and factors[10] == 1.0 and abs(factors[100] - 0.1) < 1e-12
    assert all(a <= b for a, b in zip(factors[:10], factors[1:11], strict=True))  # warm-up rises
    assert all(a >= b for a, b in zip(factors[10:-1], factors[11:], strict=True))  # then decays
