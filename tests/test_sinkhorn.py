"""Balanced Sinkhorn plan and greedy capacity-respecting rounding."""

from __future__ import annotations

import pytest
import torch

from moeconv.partition.sinkhorn import greedy_balanced_assignment, sinkhorn_plan


def reference_greedy(scores: torch.Tensor, capacity: int) -> list[int]:
    """Textbook version: list every entry, sort by (-score, flat index), take what still fits."""
    n, num_experts = scores.shape
    entries = sorted((-float(scores[i, j]), i * num_experts + j) for i in range(n) for j in range(num_experts))
    assignment, room = [-1] * n, [capacity] * num_experts
    for _, flat in entries:
        i, j = divmod(flat, num_experts)
        if assignment[i] < 0 and room[j] > 0:
            assignment[i], room[j] = j, room[j] - 1
    return assignment


@pytest.mark.parametrize("num_experts", [3, 5, 6])
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_plan_rows_sum_to_one_and_columns_to_capacity(num_experts: int, tau: float) -> None:
    generator = torch.Generator().manual_seed(num_experts)
    scores = torch.randn(60, num_experts, generator=generator, dtype=torch.float64)
    capacity = 60 // num_experts
    plan = sinkhorn_plan(scores, capacity, iterations=300, tau=tau)
    assert plan.shape == (60, num_experts)
    assert (plan >= 0).all()
    torch.testing.assert_close(plan.sum(1), torch.ones(60, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(plan.sum(0), torch.full((num_experts,), float(capacity), dtype=torch.float64), atol=1e-4, rtol=0)


def test_plan_is_stable_at_small_tau_with_large_scores() -> None:
    scores = torch.randn(60, 5, generator=torch.Generator().manual_seed(1)) * 50
    plan = sinkhorn_plan(scores, 12, iterations=100, tau=0.01)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(1), torch.ones(60), atol=1e-4, rtol=0)


def test_plan_is_differentiable() -> None:
    scores = torch.randn(60, 6, generator=torch.Generator().manual_seed(2), requires_grad=True)
    target = torch.randn(60, 6, generator=torch.Generator().manual_seed(3))
    (sinkhorn_plan(scores, 10, iterations=30, tau=0.5) * target).sum().backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0


def test_plan_rejects_unfillable_shape() -> None:
    with pytest.raises(ValueError):
        sinkhorn_plan(torch.zeros(10, 3), 3)


@pytest.mark.parametrize("num_experts", [3, 5, 6])
def test_greedy_is_balanced_and_matches_the_reference(num_experts: int) -> None:
    for seed in range(3):
        scores = torch.rand(60, num_experts, generator=torch.Generator().manual_seed(seed))
        capacity = 60 // num_experts
        assignment = greedy_balanced_assignment(scores, capacity)
        assert assignment.dtype == torch.int64 and assignment.shape == (60,)
        assert torch.bincount(assignment, minlength=num_experts).tolist() == [capacity] * num_experts
        assert assignment.tolist() == reference_greedy(scores, capacity)


def test_greedy_recovers_a_balanced_plant_and_breaks_ties_deterministically() -> None:
    planted = torch.randperm(60, generator=torch.Generator().manual_seed(4)) % 5
    scores = torch.nn.functional.one_hot(planted, 5).float() + 0.01 * torch.rand(60, 5)
    assert torch.equal(greedy_balanced_assignment(scores, 12), planted)
    ties = torch.zeros(6, 3)  # everything tied: rows fill columns in flat-index order
    assert greedy_balanced_assignment(ties, 2).tolist() == [0, 0, 1, 1, 2, 2]
