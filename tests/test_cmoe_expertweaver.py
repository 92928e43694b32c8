"""cmoe and expertweaver: balance, determinism, shared choice, exact balanced assignment, identity, errors, quality."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from test_partition import coactivation_problem, random_ffn
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import build_dense, sample_text, save_char_tokenizer
from moeconv.cli.app import app
from moeconv.config import RouterConfig, load_recipe
from moeconv.convert import convert
from moeconv.errors import RecipeError
from moeconv.io.load import load_model
from moeconv.partition import available_partitioners, get_partitioner, select_shared_neurons
from moeconv.partition.balanced import balanced_assignment
from moeconv.router import train_router

METHODS = ["cmoe", "expertweaver"]


def test_both_methods_are_registered() -> None:
    assert set(METHODS) <= set(available_partitioners())


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("num_experts", [3, 5, 6])
@pytest.mark.parametrize("gated", [True, False])
def test_balanced_every_neuron_once_deterministic_router_shape(name: str, num_experts: int, gated: bool) -> None:
    ffn = random_ffn(gated=gated, seed=num_experts)
    calib = torch.randn(300, 24, generator=torch.Generator().manual_seed(1))
    partitioner = get_partitioner(name)
    first = partitioner.partition(ffn, num_experts, calib, torch.Generator().manual_seed(5), top_k=2)
    again = partitioner.partition(ffn, num_experts, calib, torch.Generator().manual_seed(5), top_k=2)
    assignment = first.assignment
    assert assignment.dtype == torch.int64 and assignment.shape == (60,)
    assert int(assignment.min()) >= 0 and int(assignment.max()) < num_experts  # each neuron in exactly one expert
    assert torch.bincount(assignment, minlength=num_experts).tolist() == [60 // num_experts] * num_experts
    assert torch.equal(assignment, again.assignment)
    assert first.router is not None and first.router.shape == (num_experts, 24) and first.router.dtype == torch.float32
    assert torch.isfinite(first.router).all() and torch.equal(first.router, again.router)
    assert all(torch.isfinite(torch.tensor(v)) for v in first.metrics.values())


def test_expertweaver_depends_on_the_seed() -> None:
    ffn, calib = random_ffn(seed=3), torch.randn(300, 24, generator=torch.Generator().manual_seed(1))
    partitioner = get_partitioner("expertweaver", {"max_tokens": 100})  # the seed draws the tokens and the k-means start
    a = partitioner.partition(ffn, 5, calib, torch.Generator().manual_seed(0)).assignment
    b = partitioner.partition(ffn, 5, calib, torch.Generator().manual_seed(1)).assignment
    assert not torch.equal(a, b)


@pytest.mark.parametrize("seed", range(12))
def test_balanced_assignment_is_optimal(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    num_bins, capacity = [(2, 3), (3, 2), (4, 2), (2, 4)][seed % 4]
    n = num_bins * capacity
    # integer costs (many ties) on even seeds, continuous ones on odd seeds
    cost = torch.randint(0, 3, (n, num_bins), generator=g).double() if seed % 2 == 0 else torch.randn(n, num_bins, generator=g).double()
    found = balanced_assignment(cost, capacity)
    assert torch.bincount(found, minlength=num_bins).tolist() == [capacity] * num_bins
    best = min(sum(float(cost[i, b]) for i, b in enumerate(choice))
               for choice in itertools.product(range(num_bins), repeat=n)
               if all(choice.count(b) == capacity for b in range(num_bins)))
    assert float(cost[torch.arange(n), found].sum()) == pytest.approx(best, abs=1e-9)
    assert torch.equal(found, balanced_assignment(cost, capacity))


def test_balanced_assignment_beats_greedy_rounding_where_greedy_fails() -> None:
    # Greedy (cheapest entry first) puts item 0 in bin 0 and forces item 1 into bin 0's expensive alternative.
    cost = torch.tensor([[0.0, 1.0], [0.1, 10.0]])
    assert balanced_assignment(cost, 1).tolist() == [1, 0]
    with pytest.raises(ValueError, match="cannot fill"):
        balanced_assignment(torch.zeros(5, 2), 2)


def test_cmoe_shares_the_highest_activation_rates_and_expertweaver_the_lowest_cv() -> None:
    ffn = random_ffn(seed=6)
    g = torch.Generator().manual_seed(2)
    common = torch.nn.functional.normalize(torch.randn(24, generator=g), dim=0)
    calib = torch.randn(500, 24, generator=g) + 4 * common  # every token leans the same way
    loud = torch.tensor([3, 17, 29, 41, 58])
    ffn.gate[loud] = common + 0.1 * torch.randn(5, 24, generator=g)  # scale is normalized away: direction decides
    ffn.up[loud] = common + 0.1 * torch.randn(5, 24, generator=g)  # so these five top every token's |activation|
    shared, metrics = get_partitioner("cmoe").select_shared(ffn, calib, 5)
    assert shared.tolist() == loud.tolist() and metrics["marked_fraction"] > 0.4
    steady = torch.tensor([0, 9, 33])
    ffn = random_ffn(seed=7)
    ffn.gate[steady] = 0.0  # act(0 + b) is the same on every token: coefficient of variation 0
    ffn.gate_bias = torch.zeros(60)
    ffn.gate_bias[steady] = 2.0
    shared, metrics = get_partitioner("expertweaver").select_shared(ffn, calib, 3)
    assert shared.tolist() == steady.tolist() and metrics["cv_max_kept"] < 1e-6
    assert metrics["paper_size"] >= 3


def test_default_shared_choice_is_unchanged() -> None:
    ffn, calib = random_ffn(seed=8), torch.randn(200, 24)
    for name in ["random", "kmeans", "coact", "dot"]:
        shared, metrics = get_partitioner(name).select_shared(ffn, calib, 7)
        assert torch.equal(shared, select_shared_neurons(ffn, calib, 7)) and metrics == {}


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("name,options,words", [
    ("cmoe", {"k_act": 0}, ["k_act", "greater than or equal to 1"]),
    ("cmoe", {"router": "nonlinear"}, ["router", "fit"]),
    ("cmoe", {"max_tokens": 4}, ["max_tokens", "16"]),
    ("cmoe", {"kact": 10}, ["kact", "k_act"]),
    ("expertweaver", {"cv_threshold": 0}, ["cv_threshold", "greater than 0"]),
    ("expertweaver", {"features": "up_rows"}, ["features", "activations"]),
    ("expertweaver", {"iterations": 0}, ["iterations"]),
])
def test_bad_options_are_one_line_recipe_errors(name: str, options: dict, words: list[str]) -> None:
    with pytest.raises(RecipeError) as err:
        get_partitioner(name, options)
    text = _one_line(err)
    assert name in text and all(w in text for w in words), text


@pytest.mark.parametrize("name", METHODS)
def test_bad_requests_are_one_line_recipe_errors(name: str) -> None:
    ffn = random_ffn()
    partitioner = get_partitioner(name)
    with pytest.raises(RecipeError) as err:
        partitioner.partition(ffn, 5, torch.randn(5, 24), torch.Generator())
    assert "at least 16 calibration tokens" in _one_line(err) and "calibration.tokens" in str(err.value)
    with pytest.raises(RecipeError) as err:
        partitioner.select_shared(ffn, torch.randn(5, 24), 3)
    assert "at least 16" in _one_line(err)
    with pytest.raises(RecipeError) as err:
        partitioner.select_shared(ffn, torch.randn(50, 24), 61)
    assert "between 0 and 60" in _one_line(err)
    with pytest.raises(RecipeError) as err:
        partitioner.partition(ffn, 5, None, torch.Generator())
    assert "calibration" in _one_line(err)
    with pytest.raises(RecipeError) as err:
        get_partitioner("cmoe", {"k_act": 61}).partition(ffn, 5, torch.randn(50, 24), torch.Generator())
    assert "k_act=61" in _one_line(err) and "60 neurons" in str(err.value)


def layer_error(ffn, assignment: torch.Tensor, router: torch.Tensor, x: torch.Tensor, top_k: int) -> float:
    """||MoE(x) - FFN(x)||² / ||FFN(x)||² with top-k routing, selected experts weighted 1 (no bias in either)."""
    h = ffn.intermediate(x)  # [T, d_ff]
    chosen = (x @ router.T).topk(top_k, dim=1).indices  # [T, k]
    selected = torch.zeros(x.shape[0], router.shape[0]).scatter_(1, chosen, 1.0)  # [T, E]
    mask = selected[:, assignment]  # [T, d_ff]
    dense = h @ ffn.down.T
    return float((((h * mask) @ ffn.down.T) - dense).square().sum() / dense.square().sum())


@pytest.mark.parametrize("name", METHODS)
def test_beats_random_with_a_trained_router_on_structured_activations(name: str) -> None:
    """Can fail: a method that ignored the planted groups (or built a useless router) would be no better than random."""
    ffn, _, x = coactivation_problem()
    train, held = x[:1500], x[1500:]
    errors = {}
    for method in (name, "random"):
        result = get_partitioner(method).partition(ffn, 5, train, torch.Generator().manual_seed(0), top_k=1)
        router = result.router
        if router is None:  # random: the router moeconv trains for it, the strongest one it can have
            router, _ = train_router(ffn, result.assignment, train, 1, RouterConfig(steps=100, batch=256),
                                     torch.Generator().manual_seed(0))
        errors[method] = layer_error(ffn, result.assignment, router, held, 1)
    assert errors[name] < 0.7 * errors["random"], errors


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmoe-src")
    src = build_dense("llama", root / "dense", intermediate_size=72)
    save_char_tokenizer(src)
    text = root / "calib.txt"
    text.write_text(sample_text(20000))
    return src, text


def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", METHODS)
def test_all_experts_selected_is_the_dense_model(tiny_source, tmp_path, name: str) -> None:
    """top_k == experts with the method's shared neurons and router: the logits equal the dense model's."""
    src, text = tiny_source
    recipe = load_recipe(None, {"experts": 4, "top_k": 4, "shared_neurons": 8, "partition.method": name,
                                "calibration.source": str(text), "calibration.tokens": 1024, "calibration.seqlen": 64})
    out = tmp_path / "moe"
    convert(str(src), out, recipe)
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(_ids()).logits
        moe = load_model(out, device="cpu")
        got = moe(_ids()).logits
    assert ((got - dense).norm() / dense.norm()).item() < 1e-5
    layers = json.loads((out / "provenance.json").read_text())["layers"]
    assert len(layers) == 2 and all(any(k.startswith("shared_") for k in m) for m in layers.values())
    for name_, buffer in moe.state_dict().items():  # every dense neuron sits in exactly one place
        if name_.endswith("neuron_index"):
            assert torch.equal(buffer.sort().values, torch.arange(72)), name_


@pytest.mark.parametrize("name", METHODS)
def test_cli_converts_with_the_method(tiny_source, tmp_path, name: str) -> None:
    src, text = tiny_source
    out = tmp_path / "moe"
    result = CliRunner().invoke(app, ["convert", str(src), str(out), "--method", name, "--experts", "4", "--top-k", "2",
                                      "--shared-neurons", "8", "--calib", str(text), "--calib-tokens", "1024",
                                      "--seqlen", "64", "--no-router-training", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    recipe = json.loads((out / "config.json").read_text())["moe"]
    assert recipe["num_experts"] == 4 and recipe["top_k"] == 2 and recipe["shared_size"] == 8
    with torch.no_grad():
        assert torch.isfinite(load_model(out, device="cpu")(_ids()).logits).all()
    again = tmp_path / "again"
    CliRunner().invoke(app, ["convert", str(src), str(again), "--method", name, "--experts", "4", "--top-k", "2",
                             "--shared-neurons", "8", "--calib", str(text), "--calib-tokens", "1024", "--seqlen", "64",
                             "--no-router-training", "--device", "cpu", "-q"])
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards and all((out / s).read_bytes() == (again / s).read_bytes() for s in shards)  # same seed, same bytes
