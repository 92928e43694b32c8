"""Quantization grids: spec validation, RTN invariants, the QMoE ternary rule, dequantization."""

import math

import pytest
import torch

from moeconv.config import QuantSpec
from moeconv.errors import RecipeError
from moeconv.modeling.hf.quant_linear import log8_levels
from moeconv.quant.grids import dequantize, find_params, log8_grid, make_quantized, quantize_rtn

INT_SPECS = [QuantSpec(b, g, s, not s and fz) for b in (8, 4, 3, 2) for g in (-1, 16) for s in (False, True) for fz in (False, True)
             if not (s and fz)]


def test_unsupported_width_raises_one_line_recipe_error():
    for bits in (5, 1, 16, 4.0, True, "quaternary", "int4"):
        with pytest.raises(RecipeError, match="unsupported quantization width") as info:
            QuantSpec(bits)
        assert "\n" not in str(info.value)
    with pytest.raises(RecipeError, match="unsupported quantization format"):
        QuantSpec.from_format("int5")


def test_group_size_must_divide_in_features():
    w = torch.randn(4, 576)
    with pytest.raises(RecipeError, match="group size 128 does not divide in-features 576") as info:
        quantize_rtn(w, QuantSpec(4, 128))
    assert "\n" not in str(info.value)
    for bad in (0, -2, 3.5):
        with pytest.raises(RecipeError, match="group size"):
            QuantSpec(4, bad)


def test_spec_formats_and_ternary_normalisation():
    assert QuantSpec.from_format("int3", 64, True) == QuantSpec(3, 64, True)
    assert QuantSpec(3, 64).format == "int3"
    assert QuantSpec("ternary", 128, True) == QuantSpec("ternary", -1, False)
    assert QuantSpec("sub1").format == "sub1" and QuantSpec("sub1").maxq == 2


@pytest.mark.parametrize("spec", INT_SPECS, ids=lambda s: f"{s.format}-g{s.group_size}-{'sym' if s.symmetric else 'asym'}{'-fz' if s.float_zeros else ''}")
def test_rtn_codes_in_range_and_error_within_half_step(spec):
    g = torch.Generator().manual_seed(spec.bits * 7 + spec.group_size)
    w = torch.randn(9, 48, generator=g) * torch.rand(9, 1, generator=g)  # rows of different scales
    q = quantize_rtn(w, spec)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= spec.maxq
    n_groups = 1 if spec.group_size == -1 else 48 // spec.group_size
    assert q.scales.shape == (9, n_groups)
    assert torch.equal(q.scales, q.scales.half().float())  # stored precision
    assert (q.zeros is None) == spec.symmetric
    step = q.scales.repeat_interleave(48 // n_groups, dim=1)  # [out, in]
    err = (w - dequantize(q)).abs()
    # Half a step, plus what rounding the scale to fp16 can shift the extreme levels by (both grids may clip
    # the group's largest value by at most that much).
    assert bool((err <= (0.5 + spec.maxq * 2**-11) * step).all())


def test_float_zeros_reproduce_a_q4_1_grid():
    """GGUF Q4_1 stores w = d·q + m per block of 32 (d, m fp16); float zero points at group 32 recover the codes,
    and the values up to the fp16 rounding of the zero point (|m|·2^-11 per weight)."""
    g = torch.Generator().manual_seed(3)
    rows, blocks = 6, 4
    d = (torch.rand(rows, blocks, 1, generator=g) * 0.01 + 0.001).half().float()
    m = (-torch.rand(rows, blocks, 1, generator=g) * 0.1).half().float()
    q = torch.randint(0, 16, (rows, blocks, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # every block spans its full range, as llama.cpp's quantizer makes it
    w = (d * q + m).reshape(rows, blocks * 32)
    fz, iz = quantize_rtn(w, QuantSpec(4, 32, float_zeros=True)), quantize_rtn(w, QuantSpec(4, 32))
    assert torch.equal(fz.codes.reshape(rows, blocks, 32).float(), q)
    bound = (m.abs() * 2**-10 + 1e-7).expand(-1, -1, 32).reshape(rows, -1)
    assert bool(((dequantize(fz) - w).abs() <= bound).all())
    assert (dequantize(fz) - w).norm() < 0.05 * (dequantize(iz) - w).norm()  # integer zero points cannot


def test_float_zeros_fall_back_where_the_exact_range_cannot_be_stored():
    w = torch.randn(4, 16)
    w[0] = 5.0  # constant group: no range
    w[1] = 1000.0 + torch.linspace(0, 1e-3, 16)  # spread tiny next to its offset: zero beyond fp16
    q = quantize_rtn(w, QuantSpec(4, 16, float_zeros=True))
    out = dequantize(q)
    assert torch.isfinite(q.zeros).all() and torch.isfinite(out).all()
    torch.testing.assert_close(out[:2], w[:2], rtol=2e-3, atol=0)
    with pytest.raises(RecipeError, match="float_zeros"):
        QuantSpec(4, 16, True, True)


def test_rtn_is_nearest_level():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 32, generator=g)
    q = quantize_rtn(w, QuantSpec(3, 8))
    levels = torch.arange(8.0)  # every code of each group, dequantized
    scales = q.scales.repeat_interleave(8, dim=1)[..., None]
    zeros = q.zeros.repeat_interleave(8, dim=1)[..., None]
    candidates = (levels - zeros) * scales  # [out, in, 8]
    best = (candidates - w[..., None]).abs().min(dim=-1).values
    assert torch.allclose((dequantize(q) - w).abs(), best, atol=1e-6)


def test_ternary_rule_matches_qmoe_definition():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(11, 37, generator=g)
    w[3] = w[3].abs()  # a row with no negative weight: lo = 0
    w[4] = -w[4].abs()  # no positive weight: hi = 0
    w[5] = 0.0
    q = quantize_rtn(w, QuantSpec("ternary"))
    raw = torch.stack([w.min(dim=1).values.clamp(max=0), w.max(dim=1).values.clamp(min=0)], dim=1)  # [out, 2]
    mags = raw.abs()
    smallest, largest = mags[mags > 0].min().item(), mags.max().item()
    assert q.scales.tolist() == [[smallest, largest]] * 11  # the tensor's magnitude range, on every row
    # lo/hi: the log8 level nearest in log terms (relative error <= half a step), sign kept, 0 kept
    levels = log8_levels(smallest, largest)[1:].double()  # [255]
    nearest = levels[(levels.log()[None, None, :] - mags.double().clamp(min=1e-30).log()[..., None]).abs().argmin(dim=-1)]
    expected = torch.where(mags > 0, nearest, 0.0) * torch.tensor([-1.0, 1.0], dtype=torch.float64) + 0.0
    assert torch.equal(q.lo_hi.double(), expected)
    half_step = math.log(largest / smallest) / 254 / 2
    assert ((q.lo_hi.abs() / raw.abs()).log().abs()[mags > 0] <= half_step * (1 + 1e-6)).all()
    assert q.lo_hi.abs().max() == largest and q.lo_hi.abs()[mags > 0].min() == smallest  # both ends exact
    lo, hi = q.lo_hi[:, :1], q.lo_hi[:, 1:]
    assert torch.equal(dequantize(q), torch.where(w > hi / 2, hi, torch.where(w < lo / 2, lo, 0.0)))  # thresholds at half
    assert set(q.codes.unique().tolist()) <= {0, 1, 2}
    assert not bool((q.codes[3] == 1).any()) and not bool((q.codes[4] == 2).any())
    assert bool((dequantize(q)[5] == 0).all())


def test_log8_grid_is_per_tensor_and_idempotent():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(3, 20, 1, 50, generator=g) * torch.tensor([1.0, 10.0, 0.01])[:, None, None, None]  # [B, rows, 1, k]
    lo, hi = find_params(w, QuantSpec("sub1"))  # as GPTQ calls it: one grid per batch entry
    for b in range(3):
        alone_lo, alone_hi = find_params(w[b], QuantSpec("sub1"))  # as quantize_rtn calls it
        assert torch.equal(alone_lo, lo[b]) and torch.equal(alone_hi, hi[b])
        q = make_quantized(torch.zeros(20, 50, dtype=torch.uint8), lo[b], hi[b], QuantSpec("sub1"))
        rounded, mag_range = log8_grid(q.lo_hi)  # rounding levels again changes nothing: same grid, same values
        assert torch.equal(rounded, q.lo_hi) and torch.equal(mag_range, q.scales[0])
    assert not torch.equal(lo[0], lo[1] / 10)  # the batch entries have their own grids


def test_log8_relative_error_is_half_a_step():
    for spread in (10.0, 100.0):
        mags = torch.logspace(0, math.log10(spread), 1000, dtype=torch.float64).float()  # [1000] in [1, spread]
        rounded, mag_range = log8_grid(torch.stack([-mags, mags], dim=1))
        assert mag_range.tolist() == [1.0, pytest.approx(spread)]
        rel = (rounded[:, 1] / mags - 1).abs().max().item()
        bound = math.expm1(math.log(spread) / 254 / 2)  # 10x: 0.45 %, 100x: 0.91 %
        assert bound * 0.9 < rel <= bound * (1 + 1e-5)
        assert torch.equal(rounded[:, 0], -rounded[:, 1])


@pytest.mark.parametrize("spec", [QuantSpec(4, 8), QuantSpec(2, -1, True), QuantSpec("ternary")], ids=str)
def test_zero_weights_dequantize_to_exact_zero(spec):
    w = torch.zeros(3, 16)
    w[1, :8] = torch.linspace(-1, 1, 8)
    out = dequantize(quantize_rtn(w, spec))
    assert torch.isfinite(out).all()
    assert bool((out[0] == 0).all()) and bool((out[2] == 0).all())


def test_rtn_rejects_non_matrix():
    with pytest.raises(RecipeError, match="2-D"):
        quantize_rtn(torch.randn(2, 3, 4), QuantSpec(4, -1))


@pytest.mark.parametrize("spec", [QuantSpec(4, 16), QuantSpec(3, 16, True), QuantSpec(2, -1)], ids=lambda s: s.format)
def test_clip_search_never_worse_than_min_max_and_usually_better(spec):
    from moeconv.config import ClipSearch

    g = torch.Generator().manual_seed(11)
    w = torch.randn(64, 64, generator=g) ** 3  # heavy tails: clipping the extremes pays
    plain = quantize_rtn(w, spec)
    clipped = quantize_rtn(w, spec, ClipSearch(0.5))
    row_err = lambda q: ((dequantize(q) - w) ** 2).reshape(64, -1, 64 if spec.group_size == -1 else 16).sum(-1)  # noqa: E731
    assert (row_err(clipped) <= row_err(plain) * (1 + 1e-6)).all()  # shrink factor 1 is always a candidate
    assert row_err(clipped).sum() < 0.98 * row_err(plain).sum()
    assert torch.equal(quantize_rtn(w, spec, ClipSearch(0.0)).codes, plain.codes)


def test_clip_search_weights_columns():
    from moeconv.config import ClipSearch
    from moeconv.quant.grids import find_params

    w = torch.tensor([[-1.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 8.0]])
    spec = QuantSpec(2, -1)
    heavy_outlier = torch.tensor([[1.0] * 7 + [1e4]])
    light_outlier = torch.tensor([[1.0] * 7 + [1e-4]])
    s_heavy, _ = find_params(w, spec, ClipSearch(0.75), heavy_outlier)
    s_light, _ = find_params(w, spec, ClipSearch(0.75), light_outlier)
    assert s_light < s_heavy  # an unimportant outlier is clipped, an important one is kept
    with pytest.raises(RecipeError, match="clip search"):
        ClipSearch(1.0)
