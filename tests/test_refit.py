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


def _reference(x, y, held_x, held_y, w0, damps):
    """The float64 refit this implementation replaced: Gram matrix, one full Cholesky solve per damp."""
    x, y, w0 = x.double(), y.double(), w0.double()
    gram, cross = x.T @ x, x.T @ y

    def error(w):
        return float((held_y.double() - held_x.double() @ w.T).norm() / held_y.double().norm())

    best, best_error, best_damp = w0, error(w0), 0.0
    for damp in damps:
        lam = damp * float(gram.diagonal().mean())
        w = torch.cholesky_solve(cross + lam * w0.T, torch.linalg.cholesky(gram + lam * torch.eye(len(gram), dtype=gram.dtype))).T
        if error(w) < best_error * (1 - 1e-6):
            best, best_error, best_damp = w, error(w), damp
    return best, best_error, best_damp


def _problem(rows: int, inputs: int = 40, outputs: int = 6, seed: int = 7, outlier: float = 1.0):
    """Correlated, gated-looking rows (decaying column scales, one column scaled by `outlier`), a noisy linear target."""
    g = torch.Generator().manual_seed(seed)
    scale = (torch.arange(inputs) + 1.0) ** -0.5
    scale[3] *= outlier
    x = torch.relu(torch.randn(rows + 80, inputs, generator=g)) * scale
    w0, true = torch.randn(outputs, inputs, generator=g), torch.randn(outputs, inputs, generator=g)
    y = x @ true.T + 0.3 * torch.randn(rows + 80, outputs, generator=g)
    return x[:rows], y[:rows], x[rows:], y[rows:], w0


@pytest.mark.parametrize("rows", [25, 300])  # fewer rows than inputs: the dual (T x T) form; more: the Gram matrix
@pytest.mark.parametrize("precision,tol", [("auto", 1e-4), ("float32", 1e-4), ("float64", 1e-10)])
def test_refit_equals_the_float64_reference(rows, precision, tol):
    x, y, held_x, held_y, w0 = _problem(rows)
    damps = [0.001, 0.01, 0.1, 1.0]
    dtype = torch.float64 if precision == "float64" else torch.float32
    train, held = NormalEquations(40, 6, rows=rows, dtype=dtype, precision=precision), HeldOut()
    for part in (slice(0, rows // 2), slice(rows // 2, None)):
        train.add(x[part], y[part])
    held.add(held_x, held_y)
    assert train.dual == (rows < 40)
    fitted, metrics = refit_with_holdout(train, held, w0.to(dtype), damps)  # the weights come back in w0's dtype
    ref, ref_error, ref_damp = _reference(x, y, held_x, held_y, w0, damps)
    assert metrics["refit_damp"] == ref_damp > 0 and metrics["refit_kept"] == 1.0
    assert float((fitted.double() - ref).norm() / (ref - w0.double()).norm()) < tol  # relative to the correction
    assert metrics["refit_error_after"] == pytest.approx(ref_error, rel=tol)
    assert metrics["refit_error_after"] < metrics["refit_error_before"]


def test_dual_and_gram_forms_solve_the_same_ridge():
    x, y, _, _, w0 = _problem(30, inputs=64)
    dual, gram = NormalEquations(64, 6, rows=30, dtype=torch.float64), NormalEquations(64, 6, dtype=torch.float64)
    for eq in (dual, gram):
        eq.add(x, y)
    assert dual.dual and not gram.dual
    for damp in (1e-3, 0.1, 10.0):
        torch.testing.assert_close(dual.solve(w0, damp), gram.solve(w0, damp), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rows", [25, 300])
def test_ill_conditioned_candidates_are_factored_in_float64(rows):
    x, y, held_x, held_y, w0 = _problem(rows, outlier=300.0)  # one dominant neuron: λ_max ≫ mean diagonal
    damps = [1e-3, 1.0]
    factors = {}
    for precision in ("auto", "float32"):
        eq = NormalEquations(40, 6, rows=rows, dtype=torch.float32, precision=precision)
        eq.add(x, y)
        ridge = eq.solver(w0, held_x)
        factors[precision] = [ridge.factor(d * ridge.scale).dtype for d in damps]
    # κ ≤ (λ_max + λ)/λ: about 1e6 at damp 1e-3 here, under 1.6e4 at damp 1
    assert factors["auto"] == [torch.float64, torch.float32]
    assert factors["float32"] == [torch.float32, torch.float32]
    train, held = NormalEquations(40, 6, rows=rows, dtype=torch.float32), HeldOut()
    train.add(x, y)
    held.add(held_x, held_y)
    fitted, metrics = refit_with_holdout(train, held, w0, damps)
    ref, ref_error, ref_damp = _reference(x, y, held_x, held_y, w0, damps)
    assert metrics["refit_damp"] == ref_damp
    assert float((fitted.double() - ref).norm() / (ref - w0.double()).norm()) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_refit_on_cuda_equals_cpu():
    ffn = _ffn()
    g = torch.Generator().manual_seed(2)
    order, router = torch.randperm(ffn.d_ff, generator=g), torch.randn(4, ffn.d_model, generator=g)
    calib = torch.randn(4000, ffn.d_model, generator=g)
    cpu, m_cpu = refit_down(ffn, order, _gates(router, 2, 15), calib, RefitConfig())
    gpu, m_gpu = refit_down(ffn, order, _gates(router.cuda(), 2, 15), calib, RefitConfig(), device="cuda")
    assert gpu.down.device.type == "cpu" and m_gpu["refit_damp"] == m_cpu["refit_damp"]
    torch.testing.assert_close(gpu.down, cpu.down, rtol=1e-4, atol=1e-5)


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
    # dense inputs: the refit of one layer must not change what the next layer is partitioned on
    base = {"experts": 4, "top_k": 2, "router.steps": 20, "calibration.source": str(text), "calibration.tokens": 2048,
            "calibration.seqlen": 64, "partition.method": "random", "calibration.inputs": "dense"}
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


def _all_layers_at_once(model, adapter, keeps, windows, config):
    """The pruning refit as it was: one full-model forward fills every layer's rows, then each is solved (float64)."""
    held = max(1, round(windows.shape[0] * config.holdout_fraction))
    rows = [{"train": ([], []), "held": ([], [])} for _ in keeps]
    part = ["train"]
    downs = [model.get_submodule(adapter.ffn_path.format(i=i)).get_submodule(adapter.down) for i in range(len(keeps))]

    def hook(i):
        def record(module, args, output):
            y = output.float().flatten(0, -2) - (module.bias.float() if getattr(module, "bias", None) is not None else 0)
            rows[i][part[0]][0].append(args[0].float().flatten(0, -2)[:, keeps[i]])
            rows[i][part[0]][1].append(y)
        return record

    handles = [down.register_forward_hook(hook(i)) for i, down in enumerate(downs)]
    with torch.no_grad():
        for part[0], batch in (("train", windows[:-held]), ("held", windows[-held:])):
            model(input_ids=batch, use_cache=False)
    for h in handles:
        h.remove()
    out = []
    for i, down in enumerate(downs):
        w0 = (down.weight.T if adapter.conv1d else down.weight)[:, keeps[i]].detach().float()
        (x, y), (hx, hy) = ([torch.cat(t) for t in rows[i][p]] for p in ("train", "held"))
        out.append(_reference(x, y, hx, hy, w0, config.damp))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prune_refit_solves_one_layer_at_a_time_and_matches_the_all_layers_refit(family, tmp_path, monkeypatch):
    import moeconv.prune as prune
    from moeconv.io.adapters import adapter_for

    model = load_model(build_dense(family, tmp_path / family, initializer_range=0.2), device="cpu")
    adapter = adapter_for(model.config)
    windows = torch.randint(1, 96, (20, 32), generator=torch.Generator().manual_seed(3))
    d_ff = adapter.d_ff(model.config)
    keeps = [torch.randperm(d_ff, generator=torch.Generator().manual_seed(i))[: d_ff // 2].sort().values for i in range(2)]
    events = []
    created, solved = prune.normal_equations, prune.refit_with_holdout
    monkeypatch.setattr(prune, "normal_equations", lambda *a, **k: events.append("accumulate") or created(*a, **k))
    monkeypatch.setattr(prune, "refit_with_holdout", lambda *a, **k: events.append("solve") or solved(*a, **k))
    config = RefitConfig()
    got = prune._refit_kept(model, adapter, keeps, windows, config, batch=4)
    assert events == ["accumulate", "solve"] * len(keeps)  # one layer's normal equations at a time
    for (fitted, metrics), (ref, ref_error, ref_damp) in zip(got, _all_layers_at_once(model, adapter, keeps, windows, config),
                                                             strict=True):
        assert metrics["refit_damp"] == ref_damp and metrics["refit_kept"] == 1.0
        assert metrics["refit_error_after"] == pytest.approx(ref_error, rel=1e-4)
        assert float((fitted.double() - ref).norm() / ref.norm()) < 1e-4
