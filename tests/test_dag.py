"""DAG-MoE aggregator: exact identity at init, reference maths, gradients, save/load, distillation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pydantic
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from moeconv.config import DagConfig, DagTrainConfig
from moeconv.dag import DagAggregator, attach_dag, distill_dag
from moeconv.errors import DataError, RecipeError
from moeconv.ffn import DenseFFN
from moeconv.modeling.hf.modeling_moeconv import build_moe_blocks
from moeconv.modeling.hf.moe_block import MoeconvMoeBlock

D, D_FF = 24, 48


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and a busy machine makes them spin: use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_ffn(generator: torch.Generator, d: int = D, d_ff: int = D_FF) -> DenseFFN:
    def rand(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    return DenseFFN(
        up=rand(d_ff, d, std=d**-0.5),
        gate=rand(d_ff, d, std=d**-0.5),
        down=rand(d, d_ff, std=d_ff**-0.5),
        act="silu",
        down_bias=rand(d, std=0.1),
    )


def make_block(
    ffn: DenseFFN, num_experts: int, top_k: int, generator: torch.Generator, scoring: str = "none", shared_size: int = 0
) -> MoeconvMoeBlock:
    """A MoE block holding the dense FFN's neurons: shared_size always-on, the rest split at random."""
    size = (ffn.d_ff - shared_size) // num_experts
    moe = {
        "num_experts": num_experts,
        "top_k": top_k,
        "expert_size": size,
        "shared_size": shared_size,
        "activation": ffn.act,
        "scoring": scoring,
        "down_bias": ffn.down_bias is not None,
    }
    block = MoeconvMoeBlock(ffn.d_model, moe)
    order = torch.randperm(ffn.d_ff, generator=generator)  # [d_ff]
    parts = [order[:shared_size]] + [order[shared_size + e * size : shared_size + (e + 1) * size] for e in range(num_experts)]
    with torch.no_grad():
        for expert, neurons in zip([block.shared, *block.experts], parts, strict=True):
            if expert is None:
                continue
            expert.up_proj.weight.copy_(ffn.up[neurons])
            expert.gate_proj.weight.copy_(ffn.gate[neurons])
            expert.down_proj.weight.copy_(ffn.down[:, neurons])
        block.router.weight.copy_(torch.randn(num_experts, ffn.d_model, generator=generator))
        if block.down_bias is not None:
            block.down_bias.copy_(ffn.down_bias)
    return block


def perturb(dag: DagAggregator, generator: torch.Generator, std: float = 0.1) -> None:
    """Give W_up non-zero values, as training would."""
    with torch.no_grad():
        for layer in dag.rounds:
            layer.up_weight.copy_(torch.randn(layer.up_weight.shape, generator=generator) * std)


def reference_dag(dag: DagAggregator, routed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The method as written (loops over tokens and pairs, x/k added then x subtracted), in float64."""
    routed, x = routed.double(), x.double()
    tokens, k, d = routed.shape
    out = torch.zeros(tokens, d, dtype=torch.float64)
    for t in range(tokens):
        nodes = [routed[t, i] + (x[t] / k if dag.stabilize else 0) for i in range(k)]
        for layer in dag.rounds:
            w = {n: p.detach().double() for n, p in layer.named_parameters()}
            z = [F.linear(F.layer_norm(n, (d,)), w["down_weight"], w["down_bias"]) for n in nodes]
            parts = [F.linear(zi, w["pair_weight"], w["pair_bias"]).chunk(4) for zi in z]  # (g_src, g_tgt, v_src, v_tgt)
            new = []
            for i in range(k):
                msg = sum(torch.sigmoid(parts[i][0] + parts[j][1]) * (parts[i][2] + parts[j][3]) for j in range(k))
                new.append(nodes[i] + w["up_weight"] @ msg)
            nodes = new
        out[t] = sum(nodes) - (x[t] if dag.stabilize else 0)
    return out


@pytest.mark.parametrize("scoring", ["none", "softmax"])
@pytest.mark.parametrize("stabilize", [True, False])
def test_untrained_aggregator_equals_plain_moe(scoring: str, stabilize: bool) -> None:
    g = torch.Generator().manual_seed(0)
    ffn = make_ffn(g)
    x = torch.randn(3, 17, D, generator=g) * 3
    for top_k in range(1, 5):
        block = make_block(ffn, 4, top_k, g, scoring=scoring, shared_size=8)
        plain = block(x)
        attach_dag(block, DagConfig(d_g=8, rounds=2, stabilize=stabilize), g)
        with_dag = block(x)
        assert with_dag.shape == plain.shape
        torch.testing.assert_close(with_dag, plain, rtol=0, atol=1e-5)
    if scoring == "none":  # top_k == E keeps every neuron: the block with an untrained DAG is the dense FFN
        torch.testing.assert_close(with_dag, ffn.forward(x.reshape(-1, D)).reshape(x.shape), rtol=1e-5, atol=1e-5)


FORWARDS = ["forward_direct", "forward_factored"]  # forward picks one by the number of nodes


@pytest.mark.parametrize("path", FORWARDS)
@pytest.mark.parametrize("rounds", [1, 2, 3])
@pytest.mark.parametrize("stabilize", [True, False])
def test_vectorised_forward_matches_loop_reference(rounds: int, stabilize: bool, path: str) -> None:
    g = torch.Generator().manual_seed(1)
    dag = DagAggregator(D, 3, d_g=5, rounds=rounds, stabilize=stabilize)
    dag.reset_parameters(g)
    perturb(dag, g)
    routed, x = torch.randn(6, 3, D, generator=g), torch.randn(6, D, generator=g)
    torch.testing.assert_close(getattr(dag, path)(routed, x).double(), reference_dag(dag, routed, x), rtol=1e-5, atol=1e-5)


def direct_dag(dag: DagAggregator, routed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The method round by round on [T, k, d] nodes with F.layer_norm, differentiable, written independently."""
    k = routed.shape[1]
    nodes = routed + x.unsqueeze(1) / k if dag.stabilize else routed  # [T, k, d]
    for layer in dag.rounds:
        z = F.linear(F.layer_norm(nodes, nodes.shape[-1:]), layer.down_weight, layer.down_bias)  # [T, k, g]
        g_src, g_tgt, v_src, v_tgt = F.linear(z, layer.pair_weight, layer.pair_bias).chunk(4, -1)
        gate = torch.sigmoid(g_src.unsqueeze(2) + g_tgt.unsqueeze(1))  # [T, k, k, g]
        msg = (gate * (v_src.unsqueeze(2) + v_tgt.unsqueeze(1))).sum(2)  # [T, k, g]
        nodes = nodes + F.linear(msg, layer.up_weight)
    return nodes.sum(1) - (x if dag.stabilize else 0)


@pytest.mark.parametrize("path", FORWARDS)
@pytest.mark.parametrize("rounds", [1, 2, 3])
@pytest.mark.parametrize("stabilize", [True, False])
def test_forward_and_gradients_match_the_direct_formula(rounds: int, stabilize: bool, path: str) -> None:
    g = torch.Generator().manual_seed(10 + rounds)
    dag = DagAggregator(D, 3, d_g=5, rounds=rounds, stabilize=stabilize).double()
    dag.reset_parameters(g)
    perturb(dag, g, std=0.5)
    # Nodes with a mean far from 0 and channels of very different scales, as residual streams have.
    routed = (torch.randn(7, 3, D, generator=g) + 2).double().requires_grad_()
    x = (torch.randn(7, D, generator=g) * torch.linspace(0.1, 20, D)).double().requires_grad_()
    fast, direct = getattr(dag, path)(routed, x), direct_dag(dag, routed, x)
    torch.testing.assert_close(fast, direct, rtol=1e-10, atol=1e-10)
    inputs = [routed, *([x] if stabilize else []), *dag.parameters()]
    weights = torch.randn(fast.shape, generator=g).double()
    for got, want in zip(torch.autograd.grad((fast * weights).sum(), inputs),
                         torch.autograd.grad((direct * weights).sum(), inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_cached_factors_follow_weight_changes_and_dtypes() -> None:
    g = torch.Generator().manual_seed(12)
    dag = DagAggregator(D, 2, d_g=6, rounds=2)
    dag.reset_parameters(g)
    routed, x = torch.randn(9, 2, D, generator=g), torch.randn(9, D, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(dag.forward_factored(routed, x), routed.sum(1), rtol=0, atol=1e-6)
        perturb(dag, g)  # in-place update, as an optimizer step or load_state_dict does
        torch.testing.assert_close(dag.forward_factored(routed, x), direct_dag(dag, routed, x), rtol=1e-5, atol=1e-5)
        dag.load_state_dict({k: v * 0.5 for k, v in dag.state_dict().items()})
        torch.testing.assert_close(dag.forward_factored(routed, x), direct_dag(dag, routed, x), rtol=1e-5, atol=1e-5)
        dag.double()
        routed, x = routed.double(), x.double()
        torch.testing.assert_close(dag.forward_factored(routed, x), direct_dag(dag, routed, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", FORWARDS)
def test_bfloat16_forward_stays_close_to_float32(path: str) -> None:
    g = torch.Generator().manual_seed(14)
    dag = DagAggregator(64, 4, d_g=8, rounds=2)
    dag.reset_parameters(g)
    perturb(dag, g, std=0.3)
    routed, x = torch.randn(40, 4, 64, generator=g) + 1, torch.randn(40, 64, generator=g) * 4
    want = direct_dag(dag, routed, x).detach()
    with torch.no_grad():
        got = getattr(dag.bfloat16(), path)(routed.bfloat16(), x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert float((got.float() - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_routed_outputs_without_grad_equal_the_expert_loop(top_k: int) -> None:
    g = torch.Generator().manual_seed(13)
    block = make_block(make_ffn(g), 4, top_k, g, scoring="softmax")
    x = torch.randn(50, D, generator=g)
    ids, weights = block.route(x)
    looped = block.routed_outputs(x, ids, weights)  # grad mode: the per-expert loop
    with torch.no_grad():
        fast = block.routed_outputs(x, ids, weights)  # the fused op where it is built
        torch.testing.assert_close(fast, looped.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.sum(1), block.routed_sum(x, ids, weights), rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter() -> None:
    g = torch.Generator().manual_seed(2)
    block = make_block(make_ffn(g), 4, 2, g)
    dag = attach_dag(block, DagConfig(d_g=6, rounds=2), g)
    x = torch.randn(32, D, generator=g)
    target = torch.randn(32, D, generator=g)
    optimizer = torch.optim.AdamW(dag.parameters(), lr=1e-2)
    for step in range(2):
        optimizer.zero_grad()
        (block(x) - target).square().mean().backward()
        grads = {name: p.grad for name, p in dag.named_parameters()}
        if step == 0:  # W_up = 0: only W_up itself gets a gradient
            assert all(grads[n].abs().sum() > 0 for n in grads if n.endswith("up_weight"))
        else:
            assert all(grad is not None and grad.abs().sum() > 0 for grad in grads.values()), grads.keys()
        optimizer.step()


def test_gradients_with_perturbed_up_reach_every_parameter_at_once() -> None:
    g = torch.Generator().manual_seed(3)
    dag = DagAggregator(D, 3, d_g=4, rounds=2)
    dag.reset_parameters(g)
    perturb(dag, g)
    dag(torch.randn(8, 3, D, generator=g), torch.randn(8, D, generator=g)).square().sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in dag.parameters())


def test_save_load_round_trip_is_exact(tmp_path) -> None:
    g = torch.Generator().manual_seed(4)
    ffn = make_ffn(g)
    block = make_block(ffn, 4, 2, g, scoring="softmax", shared_size=8)
    config = DagConfig(d_g=6, rounds=2)
    perturb(attach_dag(block, config, g), g)
    save_file(block.state_dict(), str(tmp_path / "block.safetensors"))
    state = load_file(str(tmp_path / "block.safetensors"))
    assert {k for k in state if k.startswith("dag.")} == {f"dag.{k}" for k in block.dag.state_dict()}

    # Rebuild the way a checkpoint is loaded: config dict through JSON, then build_moe_blocks.
    moe = dict(json.loads(json.dumps({**moe_settings(block, ffn, shared_size=8), "dag": config.architecture()})))
    model = nn.Module()
    model.mlp = nn.Identity()
    build_moe_blocks(model, SimpleNamespace(moe={**moe, "ffn_path": "mlp", "layers": [0]}), D)
    loaded = model.mlp
    assert isinstance(loaded.dag, DagAggregator) and loaded.dag.d_g == 6 and len(loaded.dag.rounds) == 2
    loaded.load_state_dict(state)
    x = torch.randn(40, D, generator=g)
    assert torch.equal(loaded(x), block(x))


def moe_settings(block: MoeconvMoeBlock, ffn: DenseFFN, shared_size: int) -> dict:
    return {
        "num_experts": block.num_experts,
        "top_k": block.top_k,
        "expert_size": (ffn.d_ff - shared_size) // 4,
        "shared_size": shared_size,
        "activation": ffn.act,
        "scoring": block.scoring,
        "down_bias": True,
    }


def test_fresh_aggregator_from_config_starts_as_identity() -> None:
    # A model built from config (no weights loaded) must still compute the plain MoE sum.
    dag = DagAggregator(D, 2, **DagConfig().architecture())
    routed, x = torch.randn(5, 2, D), torch.randn(5, D)
    torch.testing.assert_close(dag(routed, x), routed.sum(1), rtol=0, atol=1e-6)


def distill_problem(seed: int, scoring: str = "none") -> tuple[MoeconvMoeBlock, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ffn = make_ffn(g)
    block = make_block(ffn, 4, 2, g, scoring=scoring)
    x = torch.randn(2048, D, generator=g)
    return block, x, ffn.forward(x)


FAST = DagTrainConfig(steps=150, batch=256, lr=1e-2)


def test_distillation_lowers_error_and_is_deterministic() -> None:
    runs = []
    for _ in range(2):
        block, x, y = distill_problem(5)
        with torch.no_grad():
            plain = (block(x) - y).norm() / y.norm()
        metrics = distill_dag(block, x, y, DagConfig(d_g=8, train=FAST), torch.Generator().manual_seed(9))
        runs.append((metrics, block.state_dict()))
    metrics, state = runs[0]
    assert metrics["rel_error_before"] == pytest.approx(float(plain), rel=0.2)  # held-out subset vs all tokens
    assert metrics["rel_error_after"] < 0.95 * metrics["rel_error_before"], metrics
    assert metrics["train_tokens"] + metrics["holdout_tokens"] == 2048
    assert runs[1][0] == metrics
    assert all(torch.equal(state[k], runs[1][1][k]) for k in state)
    assert all(p.requires_grad for p in block.parameters())  # flags restored


def test_distillation_keeps_experts_and_router_unless_asked() -> None:
    block, x, y = distill_problem(6, scoring="softmax")
    before = {k: v.clone() for k, v in block.state_dict().items()}
    distill_dag(block, x, y, FAST, torch.Generator().manual_seed(0))
    after = block.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    routed = FAST.model_copy(update={"train_router": True, "steps": 60})
    metrics = distill_dag(block, x, y, routed, torch.Generator().manual_seed(0))
    assert not torch.equal(before["router.weight"], block.router.weight)
    assert all(torch.equal(before[k], block.state_dict()[k]) for k in before if k.startswith("experts."))
    assert metrics["rel_error_after"] < metrics["rel_error_before"]


def test_an_aggregator_that_does_not_help_is_left_neutral() -> None:
    block, x, _ = distill_problem(7)
    with torch.no_grad():
        plain = block(x)  # the target is the plain MoE itself: the aggregator can only make the held-out error worse
    metrics = distill_dag(block, x, plain, DagConfig(d_g=8, train=FAST), torch.Generator().manual_seed(1))
    assert metrics["dag_kept"] == 0.0 and metrics["rel_error_after"] == metrics["rel_error_before"]
    assert all(not bool(r.up_weight.any()) for r in block.dag.rounds)  # W_up back to zero
    with torch.no_grad():
        torch.testing.assert_close(block(x), plain, rtol=0, atol=1e-6)


def test_distillation_returns_a_bfloat16_block_in_bfloat16() -> None:
    block, x, y = distill_problem(7)
    block.to(torch.bfloat16)
    distill_dag(block, x.bfloat16(), y.bfloat16(), DagTrainConfig(steps=5, batch=64), torch.Generator().manual_seed(0))
    assert all(p.dtype == torch.bfloat16 for p in block.parameters())
    assert block(x[:4].bfloat16()).dtype == torch.bfloat16


def test_bad_inputs_raise_clear_errors() -> None:
    block, x, y = distill_problem(8)
    with pytest.raises(DataError, match="shape"):
        distill_dag(block, x[:, :-1], y[:, :-1], FAST, torch.Generator())
    with pytest.raises(DataError, match="at least 2"):
        distill_dag(block, x[:1], y[:1], FAST, torch.Generator())
    with pytest.raises(RecipeError, match="train_router"):
        distill_dag(block, x, y, DagTrainConfig(train_router=True), torch.Generator())
    with pytest.raises(pydantic.ValidationError):
        DagConfig(d_g=8, heads=2)
    with pytest.raises(pydantic.ValidationError):
        DagConfig(train={"step": 3})
    with pytest.raises(ValueError, match="routed outputs"):
        DagAggregator(D, 2)(torch.randn(3, 3, D), torch.randn(3, D))
