"""Balanced entropic transport (log-domain Sinkhorn) and capacity-respecting hard rounding."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def sinkhorn_plan(scores: Tensor, capacity: float, iterations: int = 50, tau: float = 1.0) -> Tensor:
    """Soft balanced plan M = diag(u) exp(scores/tau) diag(v) with rows summing to 1, columns to `capacity`.

    scores: [n, E] with n == E * capacity. Differentiable; the log domain keeps small tau stable.
    The last normalisation is over rows, so every neuron's row sums to 1 exactly; columns converge
    to `capacity` as `iterations` grows.
    """
    n, num_experts = scores.shape
    if abs(n - num_experts * capacity) > 1e-6 * n:
        raise ValueError(f"sinkhorn_plan: {n} rows cannot fill {num_experts} columns of {capacity}")
    # float64 inside: at small tau the logits reach 1e3-1e4 and float32 rounding would leave rows off by ~1e-3.
    log_kernel = scores.to(torch.float64) / tau  # [n, E]
    log_capacity = float(np.log(capacity))
    log_v = torch.zeros(num_experts, dtype=torch.float64, device=scores.device)  # [E]
    log_u = -torch.logsumexp(log_kernel, dim=1)  # [n]
    for _ in range(iterations):
        log_v = log_capacity - torch.logsumexp(log_kernel + log_u[:, None], dim=0)  # [E]
        log_u = -torch.logsumexp(log_kernel + log_v[None, :], dim=1)  # [n]
    return torch.exp(log_kernel + log_u[:, None] + log_v[None, :]).to(scores.dtype)  # [n, E]


def greedy_balanced_assignment(scores: Tensor, capacity: int) -> Tensor:
    """Hard assignment: visit all (row, column) entries by descending score; give row i to column j
    when i is still free and j still has room. Returns [n] int64 column ids, each used `capacity` times.

    Ties are broken by flat index (stable sort), so the result is deterministic.
    """
    n, num_experts = scores.shape
    if n != num_experts * capacity:
        raise ValueError(f"greedy_balanced_assignment: {n} rows cannot fill {num_experts} columns of {capacity}")
    flat = scores.detach().to(torch.float64).reshape(-1).cpu().numpy()  # [n*E]
    order = np.argsort(-flat, kind="stable")
    rows_of, cols_of = np.divmod(order, num_experts)
    assignment = [-1] * n
    room = [capacity] * num_experts
    remaining = n
    # A plain Python loop over Python ints: ~0.1 us per entry, and it stops once every row is placed.
    for i, j in zip(rows_of.tolist(), cols_of.tolist(), strict=True):
        if assignment[i] < 0 and room[j] > 0:
            assignment[i] = j
            room[j] -= 1
            remaining -= 1
            if remaining == 0:
                break
    return torch.tensor(assignment, dtype=torch.int64, device=scores.device)


def one_hot_assignment(assignment: Tensor, num_experts: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """[n] expert ids -> [n, E] 0/1 matrix."""
    return torch.nn.functional.one_hot(assignment, num_experts).to(dtype)
