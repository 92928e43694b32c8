"""Refit: least-squares re-solve of the down projection under the routing (MoE) or the kept neurons (pruning)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_dense, sample_text, save_char_tokenizer
from moeconv.config import RefitConfig, load_recipe
from moeconv.convert import convert
from moeconv.errors import RecipeError
from moeconv.ffn import DenseFFN
from moeconv.io.load import load_model
from moeconv.modeling.hf.moe_block import route
from moeconv.prune import prune_ffn_to_active
from moeconv.refit import HeldOut, NormalEquations, neuron_gates, refit_down, refit_with_holdout


def _ffn(d: int = 24, d_ff: int = 60, seed: int = 0) -> DenseFFN:
    g = torch.Generator().manual_seed(seed)
    return DenseFFN(up=torch.randn(d_ff, d, generator=g) / d**0.5, down=torch.randn(d, d_ff, generator=g) / d_ff**0.5,
                    act="silu", gate=torch.randn(d_ff, d, generator=g) / d**0.5)


def _gates(router: torch.Tensor, top_k: int, size: int, shared: int = 0):
    def gates(x: torch.Tensor) -> torch.Tensor:
        ids, weights = route(x @ router.T, top_k, "none", False)
        return neuron_gates(ids, weights, size, router.shape[0], shared)
    return gates


def _moe_error(ffn: DenseFFN, order: torch.Tensor, gates, x: torch.Tensor) -> float:
    sub = ffn.select(order)
    h = sub.intermediate(x)
    dense = ffn.forward(x)
    return float(((h * gates(x)) @ sub.down.T - dense).norm() / dense.norm())


def test_normal_equations_match_direct_least_squares():
    g = torch.Generator().manual_seed(1)
    x, w0 = torch.randn(300, 17, generator=g), torch.randn(5, 17, generator=g)
    y = x @ torch.randn(17, 5, generator=g) + 0.1 * torch.randn(300, 5, generator=g)
    eq, held = NormalEquations(17, 5), HeldOut()
    for part in (slice(0, 120), slice(120, None)):  # fed in chunks
        eq.add(x[part], y[part])
        held.add(x[part], y[part])
    direct = float((y - x @ w0.T).norm() / y.norm())
    assert held.relative_error(w0) == pytest.approx(direct, rel=1e-6)
    exact = torch.linalg.lstsq(x.double(), y.double()).solution.T.float()  # [5, 17]
    torch.testing.assert_close(eq.solve(w0, damp=1e-9), exact, rtol=1e-4, atol=1e-4)
    strong = eq.solve(w0, damp=1e6)  # a huge ridge keeps the starting weights
    torch.testing.assert_close(strong, w0, rtol=1e-3, atol=1e-3)


def test_holdout_picks_the_damp_with_the_lowest_held_out_error():
    g = torch.Generator().manual_seed(5)
    w0, true = torch.randn(4, 30, generator=g), torch.randn(4, 30, generator=g)
    train, held = NormalEquations(30, 4), HeldOut()
    for eq, n in ((train, 60), (held, 200)):  # few training rows: a weak ridge overfits
        x = torch.randn(n, 30, generator=g)
        eq.add(x, x @ true.T + 0.5 * torch.randn(n, 4, generator=g))
    damps = [1e-4, 0.01, 0.1, 1.0, 10.0]
    errors = {d: held.relative_error(train.solve(w0, d)) for d in damps}
    fitted, metrics = refit_with_holdout(train, held, w0, damps)
    assert metrics["refit_damp"] == min(errors, key=errors.get)
    assert metrics["refit_error_after"] == pytest.approx(min(errors.values()))
    torch.testing.assert_close(fitted, train.solve(w0, metrics["refit_damp"]))
    # When no candidate beats the starting weights on the held-out rows, they are kept.
    unchanged, metrics = refit_with_holdout(train, held, true, damps)
    assert unchanged is true and metrics["refit_kept"] == 0.0 and metrics["refit_damp"] == 0.0


def test_neuron_gates_follow_routing_weights():
    ids, weights = torch.tensor([[0, 2]]), torch.tensor([[0.3, 0.7]])
    got = neuron_gates(ids, weights, expert_size=2, num_experts=3, shared_size=1)
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.3, 0.3, 0.0, 0.0, 0.7, 0.7]]))


def test_refit_lowers_error_on_fresh_tokens():
    ffn = _ffn()
    g = torch.Generator().manual_seed(2)
    order = torch.randperm(ffn.d_ff, generator=g)
    router = torch.randn(4, ffn.d_model, generator=g)
    gates = _gates(router, top_k=2, size=15)
    calib, fresh = torch.randn(4000, ffn.d_model, generator=g), torch.randn(2000, ffn.d_model, generator=g)
    fitted, metrics = refit_down(ffn, order, gates, calib, RefitConfig())
    assert metrics["refit_kept"] == 1.0 and metrics["refit_error_after"] < metrics["refit_error_before"]
    assert _moe_error(fitted, order, gates, fresh) < _moe_error(ffn, order, gates, fresh)
    torch.testing.assert_close(fitted.up, ffn.up)  # only the down projection changes
    torch.testing.assert_close(fitted.gate, ffn.gate)


def test_refit_keeps_the_dense_weights_when_every_expert_is_active():
    ffn = _ffn(seed=3)
    g = torch.Generator().manual_seed(4)
    router = torch.randn(4, ffn.d_model, generator=g)
    x = torch.randn(1000, ffn.d_model, generator=g)
    out, metrics = refit_down(ffn, torch.arange(ffn.d_ff), _gates(router, 4, 15), x, RefitConfig())
    assert metrics["refit_kept"] == 0.0 and metrics["refit_error_before"] < 1e-5
    assert out is ffn  # nothing to compensate: the exact dense model is kept bit for bit


def test_convert_with_refit_records_metrics_and_lowers_layer_error(tmp_path):
    src = build_dense("llama", tmp_path / "dense", initializer_range=0.2)
    save_char_tokenizer(src)
    text = tmp_path / "calib.txt"
    text.write_text(sample_text(20000))
    base = {"experts": 4, "top_k": 2, "router.steps": 20, "calibration.source": str(text), "calibration.tokens": 2048,
            "calibration.seqlen": 64}
    convert(str(src), tmp_path / "plain", load_recipe(None, base).model_copy(update={"refit": None}))
    convert(str(src), tmp_path / "refit", load_recipe(None, {**base, "refit": {"damp": 0.05}}))
    layers = json.loads((tmp_path / "refit" / "provenance.json").read_text())["layers"]
    assert all(m["refit_error_after"] <= m["refit_error_before"] for m in layers.values())
    assert any(m["refit_kept"] for m in layers.values())
    plain, refit = load_model(tmp_path / "plain", device="cpu"), load_model(tmp_path / "refit", device="cpu")
    p, r = plain.state_dict(), refit.state_dict()
    changed = {n for n in p if not torch.equal(p[n], r[n])}
    assert changed and all(".down_proj." in n for n in changed), sorted(changed)[:5]
    for i, metrics in layers.items():  # a layer's weights change exactly where its refit was kept
        assert any(f"layers.{i}.mlp." in n for n in changed) == bool(metrics["refit_kept"]), (i, metrics)


def _ffn_inputs_and_outputs(model, path: str, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's FFN (input, output) when `model` runs on token ids x."""
    seen, hooks = [], []
    for i in range(2):
        mlp = model.get_submodule(path.format(i=i))
        hooks.append(mlp.register_forward_hook(lambda m, a, out: seen.append((a[0].detach(), out.detach()))))
    with torch.no_grad():
        model(input_ids=x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("family,path", [("llama", "model.layers.{i}.mlp"), ("gpt2", "transformer.h.{i}.mlp")])
def test_prune_with_refit_reproduces_the_dense_ffn_better(family, path, tmp_path):
    src = build_dense(family, tmp_path / family, initializer_range=0.2)
    calib = torch.randint(1, 96, (24, 32), generator=torch.Generator().manual_seed(3))
    x = torch.randint(1, 96, (8, 32), generator=torch.Generator().manual_seed(4))
    dense = _ffn_inputs_and_outputs(load_model(src, device="cpu"), path, x)  # fresh tokens, dense layer inputs
    errors = {}
    for name, refit in (("plain", None), ("refit", RefitConfig())):
        model = prune_ffn_to_active(load_model(src, device="cpu"), 0.5, calib, refit=refit)
        with torch.no_grad():
            errors[name] = [float((model.get_submodule(path.format(i=i))(inp) - out).norm() / out.norm())
                            for i, (inp, out) in enumerate(dense)]
    assert sum(errors["refit"]) < sum(errors["plain"]), errors
    for metrics in model.prune_metrics["refit"]:
        assert metrics["refit_error_after"] <= metrics["refit_error_before"]


def test_refit_switches_in_a_recipe():
    assert load_recipe(None, {"refit": False}).refit is None
    assert load_recipe(None, {"refit": True}).refit == RefitConfig()
    assert load_recipe(None, {"refit": {"damp": 0.2}}).refit.damp == [0.2]


@pytest.mark.parametrize("block,match", [({"damp": 0}, "refit.damp"), ({"dampening": 1}, "unknown field 'refit.dampening'")])
def test_bad_refit_block_is_a_recipe_error(block, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(None, {"refit": block})


@pytest.mark.parametrize("flags,top_k,expected", [((), 2, True), (("--no-refit",), 2, False), ((), 4, False),
                                                   (("--refit",), 2, True)])
def test_plan_states_whether_refit_runs(dense_models, tmp_path, flags, top_k, expected):
    from typer.testing import CliRunner

    from moeconv.cli.app import app

    result = CliRunner().invoke(app, ["convert", str(dense_models["llama"]), str(tmp_path / "out"), "--experts", "4",
                                      "--top-k", str(top_k), "--dry-run", "--json", *flags])
    assert result.exit_code == 0, result.output
    assert ("refit" in json.loads(result.stdout)["stages"]) == expected
