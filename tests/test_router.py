"""Reference MoE forward, oracle importance and router training."""

from __future__ import annotations

import pytest
import torch

from moeconv.config import RouterConfig
from moeconv.errors import RecipeError
from moeconv.ffn import DenseFFN
from moeconv.router import expert_importance, moe_forward, train_router
from moeconv.router.reference import select_top_k


def random_ffn(d: int, d_ff: int, gated: bool, seed: int, biases: bool = False) -> DenseFFN:
    g = torch.Generator().manual_seed(seed)
    return DenseFFN(
        up=torch.randn(d_ff, d, generator=g) / d**0.5,
        down=torch.randn(d, d_ff, generator=g) / d_ff**0.5,
        act="silu" if gated else "gelu_pytorch_tanh",
        gate=torch.randn(d_ff, d, generator=g) / d**0.5 if gated else None,
        up_bias=torch.randn(d_ff, generator=g) if biases else None,
        gate_bias=torch.randn(d_ff, generator=g) if biases and gated else None,
        down_bias=torch.randn(d, generator=g) if biases else None,
    )


def balanced_assignment(d_ff: int, num_experts: int, seed: int) -> torch.Tensor:
    return torch.randperm(d_ff, generator=torch.Generator().manual_seed(seed)) % num_experts


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("num_experts", [3, 5, 6])
def test_all_experts_reproduce_the_dense_ffn(gated: bool, num_experts: int) -> None:
    ffn = random_ffn(24, 60, gated, seed=num_experts, biases=True)
    x = torch.randn(37, 24)
    router = torch.randn(num_experts, 24)
    out = moe_forward(ffn, balanced_assignment(60, num_experts, 0), router, num_experts, x)
    dense = ffn.forward(x)
    assert float((out - dense).norm() / dense.norm()) < 1e-5


@pytest.mark.parametrize("gated", [True, False])
def test_moe_forward_sums_the_selected_sub_ffns(gated: bool) -> None:
    ffn = random_ffn(24, 60, gated, seed=7, biases=True)
    assignment = balanced_assignment(60, 5, 1)
    x, router = torch.randn(11, 24), torch.randn(5, 24)
    out = moe_forward(ffn, assignment, router, 2, x)
    chosen = (x @ router.T).topk(2, dim=1).indices
    for t in range(x.shape[0]):
        expected = ffn.down_bias.clone()
        for e in chosen[t].tolist():
            expected += ffn.select(torch.nonzero(assignment == e).flatten()).forward(x[t : t + 1])[0]
        torch.testing.assert_close(out[t], expected, atol=1e-5, rtol=1e-5)


def test_expert_importance_is_the_norm_of_each_expert_output() -> None:
    ffn = random_ffn(24, 60, True, seed=3)
    assignment = balanced_assignment(60, 6, 2)
    x = torch.randn(19, 24)
    importance = expert_importance(ffn, assignment, x)
    expected = torch.stack([ffn.select(torch.nonzero(assignment == e).flatten()).forward(x).norm(dim=1) for e in range(6)], dim=1)
    torch.testing.assert_close(importance, expected, atol=1e-4, rtol=1e-4)


def planted_problem(num_experts: int = 6, tokens: int = 3000) -> tuple[DenseFFN, torch.Tensor, torch.Tensor]:
    """Neurons of expert e only fire for inputs along direction e, so the right experts are predictable from x."""
    g = torch.Generator().manual_seed(11)
    d, d_ff = 24, 60
    assignment = torch.arange(d_ff) % num_experts
    directions = torch.nn.functional.normalize(torch.randn(num_experts, d, generator=g), dim=1)
    gate = 4 * directions[assignment] + 0.3 * torch.randn(d_ff, d, generator=g)
    ffn = DenseFFN(up=torch.randn(d_ff, d, generator=g), down=torch.randn(d, d_ff, generator=g), act="silu", gate=gate)
    mix = torch.randn(tokens, num_experts, generator=g).relu()
    x = mix @ directions + 0.2 * torch.randn(tokens, d, generator=g)
    return ffn, assignment, x


def test_trained_router_beats_a_random_router() -> None:
    ffn, assignment, x = planted_problem()
    config = RouterConfig(steps=150, batch=512)
    weight, metrics = train_router(ffn, assignment, x, 2, config, torch.Generator().manual_seed(0))
    assert weight.shape == (6, 24)
    _, random_metrics = train_router(
        ffn, assignment, x, 2, RouterConfig(steps=0), torch.Generator().manual_seed(0), init=torch.randn(6, 24)
    )
    assert metrics["router_recall"] > 0.8
    assert metrics["router_recall"] > random_metrics["router_recall"] + 0.3
    assert metrics["rel_error"] < random_metrics["rel_error"]
    assert metrics["oracle_rel_error"] <= metrics["rel_error"] + 1e-6


def test_recall_and_error_match_a_direct_computation() -> None:
    ffn, assignment, x = planted_problem(tokens=400)
    init = torch.randn(6, 24)
    config = RouterConfig(steps=0, holdout_fraction=0.5)
    weight, metrics = train_router(ffn, assignment, x, 3, config, torch.Generator().manual_seed(5), init=init)
    assert torch.equal(weight, init)
    held = x[torch.randperm(400, generator=torch.Generator().manual_seed(5))[:200].sort().values]
    oracle = expert_importance(ffn, assignment, held).topk(3, dim=1).indices
    oracle_mask = torch.zeros(200, 6).scatter_(1, oracle, 1.0)
    recall = float((select_top_k(init, held, 3) * oracle_mask).sum() / (200 * 3))
    dense = ffn.forward(held)
    error = float((moe_forward(ffn, assignment, init, 3, held) - dense).norm() / dense.norm())
    assert metrics["router_recall"] == pytest.approx(recall, abs=1e-6)
    assert metrics["rel_error"] == pytest.approx(error, rel=1e-4)
    load = select_top_k(init, held, 3).mean(0)  # [E]
    assert metrics["load_max_over_mean"] == pytest.approx(float(load.max() / load.mean()), rel=1e-6)


def test_router_training_is_deterministic() -> None:
    ffn, assignment, x = planted_problem(tokens=500)
    config = RouterConfig(steps=20, batch=64)
    a, metrics_a = train_router(ffn, assignment, x, 2, config, torch.Generator().manual_seed(3))
    b, metrics_b = train_router(ffn, assignment, x, 2, config, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and metrics_a == metrics_b


def test_bad_router_inputs_raise_recipe_errors() -> None:
    ffn, assignment, x = planted_problem(tokens=100)
    with pytest.raises(RecipeError, match="top_k"):
        train_router(ffn, assignment, x, 7, RouterConfig(), torch.Generator())
    with pytest.raises(RecipeError, match="shape"):
        train_router(ffn, assignment, x, 2, RouterConfig(), torch.Generator(), init=torch.zeros(5, 24))
    with pytest.raises(Exception, match="extra"):
        RouterConfig(stepz=3)
