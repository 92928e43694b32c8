"""Streaming: converting 32 layers peaks within 1.3x of converting 4 layers of the same width."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from scale import run  # noqa: E402


def test_peak_memory_does_not_grow_with_depth(tmp_path):
    rows = run([4, 32], hidden=768, ffn=2048, experts=8, top_k=2, work=tmp_path)
    small, deep = rows
    assert deep["weights_gib"] > 7 * small["weights_gib"]
    assert deep["peak_rss_gib"] <= 1.3 * small["peak_rss_gib"], rows
