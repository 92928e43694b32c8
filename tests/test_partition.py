"""Partitioners: balance, determinism, registry errors, DOT gradients, and planted structure."""

from __future__ import annotations

import pytest
import torch

from moeconv.config import RouterConfig
from moeconv.errors import RecipeError
from moeconv.ffn import DenseFFN
from moeconv.partition import available_partitioners, get_partitioner, select_shared_neurons
from moeconv.partition.dot import DotConfig, dot_loss
from moeconv.router import train_router

FAST_DOT = {"steps": 25, "batch": 64, "max_tokens": 256, "sinkhorn_iterations": 10}
FAST = {"dot": FAST_DOT, "coact": {"max_tokens": 128}}


def random_ffn(d: int = 24, d_ff: int = 60, gated: bool = True, seed: int = 0) -> DenseFFN:
    g = torch.Generator().manual_seed(seed)
    return DenseFFN(
        up=torch.randn(d_ff, d, generator=g) / d**0.5,
        down=torch.randn(d, d_ff, generator=g) / d_ff**0.5,
        act="silu" if gated else "gelu_pytorch_tanh",
        gate=torch.randn(d_ff, d, generator=g) / d**0.5 if gated else None,
        up_bias=None if gated else torch.randn(d_ff, generator=g),
        down_bias=torch.randn(d, generator=g),
    )


def test_registry_lists_the_methods() -> None:
    assert {"random", "kmeans", "coact", "dot"} <= set(available_partitioners())


@pytest.mark.parametrize("name", ["random", "kmeans", "coact", "dot"])
@pytest.mark.parametrize("num_experts", [3, 5, 6])
@pytest.mark.parametrize("gated", [True, False])
def test_every_partitioner_is_balanced_and_deterministic(name: str, num_experts: int, gated: bool) -> None:
    ffn = random_ffn(gated=gated, seed=num_experts)
    calib = torch.randn(300, 24, generator=torch.Generator().manual_seed(1))
    partitioner = get_partitioner(name, FAST.get(name))
    first = partitioner.partition(ffn, num_experts, calib, torch.Generator().manual_seed(5), top_k=2)
    again = partitioner.partition(ffn, num_experts, calib, torch.Generator().manual_seed(5), top_k=2)
    assert first.assignment.dtype == torch.int64 and first.assignment.shape == (60,)
    assert torch.bincount(first.assignment, minlength=num_experts).tolist() == [60 // num_experts] * num_experts
    assert torch.equal(first.assignment, again.assignment)
    if name == "dot":
        assert first.router is not None and first.router.shape == (num_experts, 24)
        assert torch.equal(first.router, again.router)
        assert all(torch.isfinite(torch.tensor(v)) for v in first.metrics.values())
    else:
        assert first.router is None


def test_random_partition_depends_on_the_seed() -> None:
    ffn = random_ffn()
    partitioner = get_partitioner("random")
    a = partitioner.partition(ffn, 5, None, torch.Generator().manual_seed(0)).assignment
    b = partitioner.partition(ffn, 5, None, torch.Generator().manual_seed(1)).assignment
    assert not torch.equal(a, b)


def test_kmeans_recovers_planted_weight_clusters() -> None:
    g = torch.Generator().manual_seed(3)
    planted = torch.randperm(60, generator=g) % 5
    centres = torch.randn(5, 24, generator=g)
    rows = centres[planted] + 0.05 * torch.randn(60, 24, generator=g)
    ffn = DenseFFN(up=rows, down=torch.randn(24, 60, generator=g), act="gelu_pytorch_tanh")
    found = get_partitioner("kmeans").partition(ffn, 5, None, torch.Generator().manual_seed(0)).assignment
    # Same clusters up to relabelling: the co-membership matrices agree.
    same = lambda a: a[:, None] == a[None, :]  # noqa: E731
    assert torch.equal(same(found), same(planted))


def coactivation_problem() -> tuple[DenseFFN, torch.Tensor, torch.Tensor]:
    """Neuron group e fires only on tokens near direction e; groups are interleaved in neuron order."""
    g = torch.Generator().manual_seed(11)
    d, d_ff, num_experts = 24, 60, 5
    planted = torch.arange(d_ff) % num_experts
    directions = torch.nn.functional.normalize(torch.randn(num_experts, d, generator=g), dim=1)
    gate = 4 * directions[planted] + 0.3 * torch.randn(d_ff, d, generator=g)
    ffn = DenseFFN(up=torch.randn(d_ff, d, generator=g), down=torch.randn(d, d_ff, generator=g), act="silu", gate=gate)
    which = torch.randint(num_experts, (2000,), generator=g)
    x = 2 * directions[which] + 0.3 * torch.randn(2000, d, generator=g)
    return ffn, planted, x


def test_coact_recovers_planted_coactivation_groups() -> None:
    ffn, planted, x = coactivation_problem()
    found = get_partitioner("coact").partition(ffn, 5, x, torch.Generator().manual_seed(0)).assignment
    same = lambda a: a[:, None] == a[None, :]  # noqa: E731
    assert float((same(found) == same(planted)).float().mean()) > 0.95


def test_dot_from_scratch_beats_random_on_planted_groups() -> None:
    ffn, _, x = coactivation_problem()
    config = {"init": "normal", "steps": 120, "batch": 256, "max_tokens": 2000, "sinkhorn_iterations": 20}
    router_config = RouterConfig(steps=100, batch=256)
    errors = {}
    for name, cfg in [("dot", config), ("random", None)]:
        result = get_partitioner(name, cfg).partition(ffn, 5, x, torch.Generator().manual_seed(0), top_k=1)
        _, metrics = train_router(
            ffn, result.assignment, x, 1, router_config, torch.Generator().manual_seed(0), init=result.router
        )
        errors[name] = metrics["rel_error"]
    assert errors["dot"] < 0.8 * errors["random"]


def test_dot_gradients_reach_the_affinity_and_the_router() -> None:
    ffn = random_ffn(seed=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 24, generator=g)
    h = ffn.intermediate(x)
    y = h @ ffn.down.T
    affinity = (0.01 * torch.randn(60, 6, generator=g)).requires_grad_(True)
    router = (0.01 * torch.randn(6, 24, generator=g)).requires_grad_(True)
    loss, fit = dot_loss(affinity, router, x, h, y, ffn.down.T, 10, 2, 0.5, DotConfig(sinkhorn_iterations=20))
    loss.backward()
    for grad in (affinity.grad, router.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert 0 < float(fit) < 10


def test_dot_with_all_experts_selected_fits_exactly() -> None:
    ffn = random_ffn(seed=4)
    x = torch.randn(40, 24)
    h = ffn.intermediate(x)
    _, fit = dot_loss(torch.randn(60, 3), torch.randn(3, 24), x, h, h @ ffn.down.T, ffn.down.T, 20, 3, 1.0, DotConfig())
    assert float(fit) < 1e-10


def test_registry_errors_are_recipe_errors() -> None:
    with pytest.raises(RecipeError, match="random") as err:
        get_partitioner("spectral")
    assert "dot" in str(err.value) and "kmeans" in str(err.value)
    with pytest.raises(RecipeError, match="stepz"):
        get_partitioner("dot", {"stepz": 3})
    with pytest.raises(RecipeError, match="steps"):
        get_partitioner("dot", {"steps": 0})
    with pytest.raises(RecipeError):
        get_partitioner("random", {"anything": 1})


def test_bad_partition_requests_are_recipe_errors() -> None:
    ffn = random_ffn()
    with pytest.raises(RecipeError, match="divides"):
        get_partitioner("random").partition(ffn, 7, None, torch.Generator())
    with pytest.raises(RecipeError, match="calibration"):
        get_partitioner("coact").partition(ffn, 5, None, torch.Generator())
    with pytest.raises(RecipeError, match="top_k"):
        get_partitioner("dot").partition(ffn, 5, torch.randn(10, 24), torch.Generator(), top_k=6)
    with pytest.raises(RecipeError, match="width"):
        get_partitioner("coact").partition(ffn, 5, torch.randn(10, 23), torch.Generator())


def test_shared_neurons_are_the_most_active() -> None:
    ffn = random_ffn(seed=6)
    planted = torch.randperm(60, generator=torch.Generator().manual_seed(7))[:7]
    ffn.gate[planted] *= 20  # these seven neurons fire far harder than the rest on any input
    ffn.up[planted] *= 20
    calib = torch.randn(500, 24)
    shared = select_shared_neurons(ffn, calib, 7, chunk=64)
    assert shared.dtype == torch.int64 and torch.equal(shared, shared.sort().values)
    assert shared.tolist() == sorted(planted.tolist())
    assert select_shared_neurons(ffn, calib, 0).numel() == 0
    with pytest.raises(RecipeError):
        select_shared_neurons(ffn, calib, 61)
