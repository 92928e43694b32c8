"""GPTQ: beats RTN on correlated inputs, batched == unbatched, act_order, dead inputs, Cholesky fallback."""

import pytest
import torch

from moeconv.config import QuantSpec
from moeconv.errors import RecipeError
from moeconv.quant.gptq import (
    HessianAccumulator,
    gptq_quantize,
    gptq_quantize_batched,
    relative_output_error,
)
from moeconv.quant.grids import dequantize, dequantize_codes, find_params, quantize_codes, quantize_rtn

LOW_BIT_SPECS = [QuantSpec(4, 32), QuantSpec(3, 32), QuantSpec(2, 32), QuantSpec("ternary"), QuantSpec(4, -1, True),
                 QuantSpec(4, 32, float_zeros=True), QuantSpec(3, -1, float_zeros=True)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Small tensors: intra-op threads only add synchronisation (several times slower on a loaded 2-core box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _correlated_inputs(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d) + torch.randn(d, d, generator=g) / d**0.5
    scales = torch.exp(torch.randn(d, generator=g))  # features of different magnitudes, as in LLMs
    return (torch.randn(n, d, generator=g) @ mix) * scales  # [n, d]


def _hessian(x):
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(97):
        acc.add_batch(chunk)
    return acc.finalize()


def test_hessian_accumulator_is_2_xtx_over_n():
    x = torch.randn(3, 50, 24, dtype=torch.float64)
    acc = HessianAccumulator(24)
    acc.add_batch(x[0])
    acc.add_batch(x[1:])  # any leading shape
    flat = x.reshape(-1, 24)
    assert acc.num_samples == 150
    assert torch.allclose(acc.finalize().double(), 2 * flat.T @ flat / 150, rtol=1e-5, atol=1e-5)
    assert torch.equal(HessianAccumulator(5).finalize(), torch.zeros(5, 5))


@pytest.mark.parametrize("spec", LOW_BIT_SPECS, ids=lambda s: f"{s.format}-g{s.group_size}")
def test_gptq_output_error_below_rtn(spec):
    x = _correlated_inputs(2048, 128, seed=0)
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    result = gptq_quantize(w, _hessian(x), spec)
    assert not result.fell_back and result.message == ""
    ref = x @ w.T
    gptq_err = ((x @ dequantize(result.q).T - ref).norm() / ref.norm()).item()
    rtn_err = ((x @ dequantize(quantize_rtn(w, spec)).T - ref).norm() / ref.norm()).item()
    assert gptq_err < 0.98 * rtn_err
    assert result.error == pytest.approx(gptq_err, rel=1e-3)  # the reported error is the real output error


def _unblocked_gptq_reference(w, H, spec, group, damp=0.01):
    """GPTQ without lazy blocks, in float64: quantize a column, propagate its error to all later columns."""
    W, n = w.double().clone(), w.shape[1]
    H = H.double() + damp * H.diag().double().mean() * torch.eye(n, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    codes = torch.zeros(w.shape, dtype=torch.uint8)
    for j in range(n):
        if j % group == 0:
            p0, p1 = find_params(W[:, j : j + group].float(), spec)
        codes[:, j] = quantize_codes(W[:, j].float(), p0, p1, spec)
        err = (W[:, j] - dequantize_codes(codes[:, j], p0, p1, spec).double()) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None]
    return codes


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(2, 32)], ids=lambda s: s.format)
def test_blocked_gptq_matches_unblocked_reference(spec):
    x = _correlated_inputs(1024, 96, seed=8)
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(9))
    H = _hessian(x)
    codes = gptq_quantize(w, H, spec, block_size=64).q.codes  # groups of 32 inside blocks of 64
    mismatch = (codes != _unblocked_gptq_reference(w, H, spec, 32)).float().mean().item()
    assert mismatch <= 0.002  # fp32 vs fp64 may flip a rare tie


@pytest.mark.parametrize("spec", [QuantSpec(3, 32), QuantSpec(2, -1), QuantSpec("ternary")], ids=lambda s: s.format)
def test_act_order_beats_rtn(spec):
    x = _correlated_inputs(2048, 128, seed=2)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    H = _hessian(x)
    result = gptq_quantize(w, H, spec, act_order=True)
    rtn = quantize_rtn(w, spec)
    assert result.error < float(relative_output_error(w, dequantize(rtn), H))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", [QuantSpec(4, 16), QuantSpec(3, -1, True), QuantSpec("ternary")], ids=lambda s: s.format)
def test_diagonal_hessian_reduces_to_rtn_exactly(spec, act_order):
    # No correlations -> no error to propagate: GPTQ must give RTN's codes in the original column order,
    # which checks that act_order's permutation is undone and static groups use the natural groups.
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 64, generator=g)
    H = torch.diag(torch.rand(64, generator=g) + 0.1)
    result = gptq_quantize(w, H, spec, act_order=act_order, block_size=24)
    rtn = quantize_rtn(w, spec)
    assert torch.equal(result.q.codes, rtn.codes)
    assert torch.equal(dequantize(result.q), dequantize(rtn))


@pytest.mark.parametrize("act_order", [False, True])
def test_batched_equals_unbatched(act_order):
    spec = QuantSpec(3, 32)
    w = torch.randn(4, 48, 96, generator=torch.Generator().manual_seed(5))
    H = torch.stack([_hessian(_correlated_inputs(300 + 50 * b, 96, seed=10 + b)) for b in range(4)])
    H[2] = -torch.eye(96)  # one broken problem must not affect the others
    batched = gptq_quantize_batched(w, H, spec, act_order=act_order, names=[f"e{b}" for b in range(4)])
    for b, res in enumerate(batched):
        single = gptq_quantize(w[b], H[b], spec, act_order=act_order, name=f"e{b}")
        assert torch.equal(res.q.codes, single.q.codes)
        assert torch.equal(res.q.scales, single.q.scales) and torch.equal(res.q.zeros, single.q.zeros)
        assert res.fell_back == single.fell_back == (b == 2)


def test_failed_cholesky_falls_back_to_rtn_with_flag_and_name():
    w = torch.randn(8, 16)
    spec = QuantSpec(4, 8)
    for H in (-torch.eye(16), torch.full((16, 16), float("nan"))):
        result = gptq_quantize(w, H, spec, name="model.layers.3.mlp.down_proj")
        assert result.fell_back
        assert "model.layers.3.mlp.down_proj" in result.message and "round-to-nearest" in result.message
        assert "\n" not in result.message
        assert torch.equal(result.q.codes, quantize_rtn(w, spec).codes)


def test_dead_inputs_keep_their_weights():
    x = _correlated_inputs(512, 64, seed=6)
    x[:, [3, 40]] = 0  # features never active in the calibration data
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(7))
    spec = QuantSpec(4, -1)
    result = gptq_quantize(w, _hessian(x), spec)
    assert not result.fell_back and torch.isfinite(dequantize(result.q)).all()
    rtn = quantize_rtn(w, spec)  # per-row grid from W: dead columns get exactly RTN's codes
    assert torch.equal(result.q.codes[:, [3, 40]], rtn.codes[:, [3, 40]])
    empty = gptq_quantize(w, torch.zeros(64, 64), spec)  # an expert no token was routed to
    assert torch.equal(empty.q.codes, rtn.codes)


def test_bad_settings_raise():
    w, H = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(RecipeError, match="damp"):
        gptq_quantize(w, H, QuantSpec(4, 8), damp=-0.1)
    with pytest.raises(RecipeError, match="does not divide"):
        gptq_quantize(w, H, QuantSpec(4, 3))
    with pytest.raises(ValueError, match="expected w"):
        gptq_quantize_batched(w, H, QuantSpec(4, 8))


def test_upper_factor_of_inverse_hessian():
    from moeconv.quant.gptq import _upper_cholesky_of_inverse

    H = torch.stack([_hessian(_correlated_inputs(400, 48, seed=s)) + 0.01 * torch.eye(48) for s in (12, 13)]).double()
    U, failed = _upper_cholesky_of_inverse(H)
    assert not failed.any()
    assert torch.equal(U, U.triu()) and (torch.diagonal(U, dim1=-2, dim2=-1) > 0).all()
    assert torch.allclose(U.mT @ U, torch.linalg.inv(H), rtol=1e-8, atol=1e-10)


def test_row_terms_give_the_error_of_any_row_subset():
    from moeconv.quant.gptq import relative_error_of

    x = _correlated_inputs(1024, 64, seed=14)
    w = torch.randn(30, 64, generator=torch.Generator().manual_seed(15))
    H = _hessian(x)
    result = gptq_quantize(w, H, QuantSpec(3, 16))
    deq = dequantize(result.q)
    for rows in (slice(0, 30), slice(0, 7), slice(7, 30)):
        ref = relative_output_error(w[rows], deq[rows], H)
        assert relative_error_of(result.row_terms[rows]).item() == pytest.approx(ref.item(), rel=1e-4)


def test_clip_search_in_gptq_lowers_output_error():
    from moeconv.config import ClipSearch

    x = _correlated_inputs(2048, 128, seed=16)
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(17)) ** 3 * 0.05  # heavy-tailed weights
    H = _hessian(x)
    for spec in (QuantSpec(3, 32), QuantSpec(4, 32, True)):
        plain = gptq_quantize(w, H, spec)
        clipped = gptq_quantize(w, H, spec, clip=ClipSearch(0.5))
        assert clipped.error < plain.error
        static = gptq_quantize(w, H, spec, act_order=True, clip=ClipSearch(0.5))  # static groups: searched up front
        assert static.error < gptq_quantize(w, H, spec, act_order=True).error
