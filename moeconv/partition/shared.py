"""Choice of the always-active (shared-expert) neurons: the most active ones on calibration data."""

from __future__ import annotations

import torch
from torch import Tensor

from moeconv.errors import RecipeError
from moeconv.ffn import DenseFFN


def select_shared_neurons(ffn: DenseFFN, calib: Tensor, count: int, chunk: int = 8192) -> Tensor:
    """[count] int64 sorted indices of the neurons with the largest mean |h| on calib [T, d]."""
    if not 0 <= count <= ffn.d_ff:
        raise RecipeError(f"cannot keep {count} shared neurons out of {ffn.d_ff}; choose between 0 and {ffn.d_ff}")
    if calib.shape[0] == 0:
        raise RecipeError("shared-neuron selection needs calibration tokens; capture some or set the count to 0")
    total = torch.zeros(ffn.d_ff, dtype=torch.float64)  # [d_ff]
    with torch.no_grad():
        # Chunked so that [T, d_ff] never exists at once for large T.
        for start in range(0, calib.shape[0], chunk):
            h = ffn.intermediate(calib[start : start + chunk].to(ffn.up.dtype))  # [t, d_ff]
            total += h.abs().sum(0, dtype=torch.float64)
    # Stable descending order: ties go to the lower index, so the choice is reproducible.
    order = torch.argsort(-total, stable=True)
    return order[:count].sort().values
