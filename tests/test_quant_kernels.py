"""The quantized linear ops (moeconv::quant_linear / ternary_linear / sub1_linear) on every CPU vector path against the
PyTorch reference, on awkward shapes (rows and columns that are not multiples of the vector width, the group size or
the 512-column block), T in {1, 3, 17, 64}; each test runs on a fixed seed and on this run's fresh one
(MOECONV_TEST_SEED replays it).

Tolerance, from the arithmetic: kernel and reference dequantize every weight with the same float32 operations (tested
bit for bit below), so they differ only in the order of the float32 sums of y_j = sum_i w_ji x_i + b_j. Each order's
error is at most gamma_n * sum_i |w_ji x_i| (gamma_n ~ n u, u = 2^-24, n = in + 1 terms with the bias), so the two
differ by at most 2 gamma_n * (|W| |x| + |b|); we allow 2 (n + 2) u times that. bfloat16 outputs are that float32
result rounded once more: two such roundings of nearby values may land one bf16 step apart, 2^-7 |y|.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

from conftest import KERNEL_SEED
from moeconv.kernels import native, quant_ops, quant_reference  # noqa: F401 - quant_ops registers the ops
from moeconv.modeling.hf.quant_linear import build_sub1_table, dequantize_buffers, log8_levels
from moeconv.quant import sub1
from moeconv.quant.packing import pack_bits

FIXED_SEED = 20261207
CPU_ISAS = native.available_cpu_isas()
NATIVE = pytest.mark.skipif(not CPU_ISAS, reason="moeconv CPU kernels are not built")
U = 2.0**-24
TS = (1, 3, 17, 64)
# (out, in, group): 37 and 19 rows are not multiples of 2, 4 or 8 row tiles; 203 columns are odd; 1064 spans three
# 512-column blocks whose edges cut groups of 56; 29 and 56 are not multiples of 8 or 16 lanes. Groups of 32 and 64
# (and one group per row) take the registers-only fast path at T <= 4 (csrc/cpu/quant_cpu_impl.h: fused_fits), the
# others the buffered path, which T > 4 takes for every shape.
INT_SHAPES = [(37, 203, 29), (37, 203, -1), (70, 1064, 56), (19, 96, 32), (21, 320, 64)]
TERNARY_SHAPES = [(37, 203), (70, 1064), (9, 16)]


@pytest.fixture(params=[FIXED_SEED, KERNEL_SEED], ids=["fixed-seed", "fresh-seed"])
def seed(request) -> int:
    torch.manual_seed(request.param)
    return request.param


@contextmanager
def cpu_isa(isa: str):
    previous = native.set_cpu_isa(isa)
    try:
        yield
    finally:
        native.set_cpu_isa(previous)


def int_case(out: int, cols: int, group: int, bits: int, zero_mode: str):
    """Packed buffers of a random intN matrix: codes uniform, fp16 scales in [0.01, 0.1], zeros per mode."""
    n_groups = 1 if group == -1 else cols // group
    codes = torch.randint(0, 2**bits, (out, cols), dtype=torch.uint8)
    buffers = {"qweight": pack_bits(codes, bits), "scales": (torch.rand(out, n_groups) * 0.09 + 0.01).half()}
    if zero_mode == "packed":
        buffers["qzeros"] = pack_bits(torch.randint(0, 2**bits, (out, n_groups), dtype=torch.uint8), bits)
    elif zero_mode == "float":
        buffers["zeros"] = (torch.rand(out, n_groups) * (2**bits - 1)).half()
    fmt = {"format": f"int{bits}", "in_features": cols, "out_features": out, "group_size": group,
           "symmetric": zero_mode == "symmetric", **({"float_zeros": True} if zero_mode == "float" else {})}
    return buffers, fmt


def int_args(buffers: dict, bits: int, group: int) -> tuple:
    zeros = buffers.get("qzeros", buffers.get("zeros"))
    return buffers["qweight"], buffers["scales"], zeros


def ternary_symbols(out: int, cols: int) -> torch.Tensor:
    return torch.multinomial(torch.tensor([0.8, 0.1, 0.1]), out * cols, replacement=True).reshape(out, cols).to(torch.uint8)


def log8_buffers(out: int) -> dict:
    mag_range = torch.tensor([0.01, 0.2])
    return {"lo_hi_codes": torch.randint(1, 256, (out, 2), dtype=torch.uint8), "lo_hi_range": mag_range}


def lo_hi_float(buffers: dict) -> torch.Tensor:
    levels = log8_levels(*buffers["lo_hi_range"].tolist())
    return levels[buffers["lo_hi_codes"].long()] * torch.tensor([-1.0, 1.0])  # [out, 2]


def sub1_case(out: int, cols: int, block_rows: int):
    symbols = ternary_symbols(out, cols)
    table = build_sub1_table(sub1.pair_counts(symbols))
    codes, offsets = sub1.encode(symbols, sub1.Sub1Dictionary(table), block_rows)
    return symbols, codes, offsets, table


def bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, want: torch.Tensor) -> torch.Tensor:
    """The allowed |kernel - reference| per output (module docstring)."""
    mag = x.double().abs() @ weight.double().abs().T + (0 if bias is None else bias.double().abs())
    allowed = 2 * (x.shape[-1] + 2) * U * mag
    if want.dtype == torch.bfloat16:
        allowed = allowed + 2.0**-7 * want.double().abs()
    return allowed


def check(got: torch.Tensor, want: torch.Tensor, x, weight, bias, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, what
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), f"{what}: non-finite outputs differ from the reference's"
    err = (got.double() - want.double()).abs()[finite]
    allowed = bound(x.nan_to_num(0.0, 0.0, 0.0), weight.nan_to_num(0.0, 0.0, 0.0), bias, want)[finite]
    assert bool((err <= allowed).all()), f"{what}: max excess {(err - allowed).max().item():.3g}"


def call(args: tuple, x: torch.Tensor, bias: torch.Tensor | None, reference: bool = False) -> torch.Tensor:
    """args = ("int", qweight, scales, zeros, bits, group) | ("ternary", qweight, lo_hi)
    | ("sub1", codes, block_offsets, dictionary, lo_hi, block_rows): the op, or its reference."""
    kind, *rest = args
    ops = quant_reference if reference else torch.ops.moeconv
    if kind == "int":
        qweight, scales, zeros, bits, group = rest
        return ops.quant_linear(x, qweight, scales, zeros, bias, bits, group)
    if kind == "ternary":
        return ops.ternary_linear(x, rest[0], rest[1], bias)
    codes, offsets, table, lo_hi, block_rows = rest
    return ops.sub1_linear(x, codes, offsets, table, lo_hi, bias, block_rows)


def run_all(args: tuple, weight: torch.Tensor, seed: int, what: str) -> None:
    """Every T, float32 and bfloat16 x, with and without bias, on every CPU path; non-finite x at T = 64."""
    rows, cols = weight.shape
    for T in TS:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(T, cols).to(dtype)
            if T == 64:
                x[0, 3], x[1, cols - 1], x[2, 0] = float("inf"), float("nan"), float("-inf")
            bias = torch.randn(rows) if T % 2 else None
            want = call(args, x, bias, reference=True)
            if T == 64:
                assert not torch.isfinite(want[:3]).any() and torch.isfinite(want[3:]).all(), what
            for isa in CPU_ISAS:
                with cpu_isa(isa):
                    got = call(args, x, bias)
                check(got, want, x.float(), weight, bias, f"{what} T={T} {dtype} isa={isa} seed={seed}")


@NATIVE
@pytest.mark.parametrize("shape", INT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("zero_mode", ["packed", "float", "symmetric"])
def test_int_kernels_match_reference(seed, shape, bits, zero_mode):
    out, cols, group = shape
    buffers, fmt = int_case(out, cols, group, bits, zero_mode)
    weight = dequantize_buffers(buffers, fmt)
    qweight, scales, zeros = int_args(buffers, bits, group)
    assert torch.equal(quant_reference.int_weight(qweight, scales, zeros, bits, group, cols), weight)
    run_all(("int", qweight, scales, zeros, bits, group), weight, seed, f"int{bits} {zero_mode} {shape}")


@NATIVE
@pytest.mark.parametrize("shape", TERNARY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ternary_kernel_matches_reference(seed, shape):
    out, cols = shape
    buffers = {"qweight": pack_bits(ternary_symbols(out, cols), 2), **log8_buffers(out)}
    fmt = {"format": "ternary", "in_features": cols, "out_features": out, "lo_hi": "log8"}
    weight = dequantize_buffers(buffers, fmt)
    lo_hi = lo_hi_float(buffers)
    assert torch.equal(quant_reference.ternary_weight(quant_reference.unpack_codes(buffers["qweight"], 2, cols), lo_hi), weight)
    run_all(("ternary", buffers["qweight"], lo_hi), weight, seed, f"ternary {shape}")


# (out, in, block_rows): rows of 2P symbols decode packed 4 per byte when 2P % 4 == 0 (203, 1064, 16, 7 columns), else
# one symbol per byte (201, 6); blocks of 32 rows are decoded 8 rows at a time, codes spanning those groups carried.
SUB1_SHAPES = [(37, 203, 32), (70, 1064, 5), (9, 16, 1), (33, 7, 4), (37, 201, 32), (12, 6, 3)]


@NATIVE
@pytest.mark.parametrize("shape", SUB1_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sub1_kernel_matches_reference(seed, shape):
    out, cols, block_rows = shape
    symbols, codes, offsets, table = sub1_case(out, cols, block_rows)
    lo_hi = lo_hi_float(log8_buffers(out))
    weight = quant_reference.ternary_weight(symbols, lo_hi)
    assert torch.equal(quant_reference.sub1_symbols(codes, offsets, table, out, cols, block_rows), symbols)
    run_all(("sub1", codes, offsets, table, lo_hi, block_rows), weight, seed, f"sub1 {shape}")


@NATIVE
def test_nan_and_inf_weights_propagate(seed):
    """A NaN scale, an Inf float zero, an Inf lo: the rows they touch are non-finite on every path, the rest exact."""
    buffers, fmt = int_case(37, 203, 29, 4, "float")
    buffers["scales"][2, 0], buffers["zeros"][5, 6] = float("nan"), float("inf")
    qweight, scales, zeros = int_args(buffers, 4, 29)
    lo_hi = lo_hi_float(log8_buffers(37))
    lo_hi[4, 0] = float("-inf")
    x = torch.randn(3, 203)
    for args in (("int", qweight, scales, zeros, 4, 29), ("ternary", pack_bits(ternary_symbols(37, 203), 2), lo_hi)):
        want = call(args, x, None, reference=True)
        assert not torch.isfinite(want[:, 2 if args[0] == "int" else 4]).any()
        for isa in CPU_ISAS:
            with cpu_isa(isa):
                got = call(args, x, None)
            assert torch.equal(torch.isfinite(got), torch.isfinite(want)), f"{args[0]} isa={isa} seed={seed}"


@NATIVE
def test_corrupt_sub1_stream_is_refused():
    symbols, codes, offsets, table = sub1_case(40, 30, 8)
    lo_hi = lo_hi_float(log8_buffers(40))
    x = torch.randn(2, 30)
    bad_offsets = offsets.clone()
    bad_offsets[2] += 1
    for bad in ((codes, bad_offsets, table), (codes, offsets, table[:5])):
        with pytest.raises(RuntimeError, match="does not decode"):
            torch.ops.moeconv_C.sub1_linear_out(x, *bad, lo_hi, None, 8, torch.empty(2, 40))
        with pytest.raises(ValueError):
            quant_reference.sub1_linear(x, *bad, lo_hi, None, 8)


def opcheck_samples() -> list[tuple]:
    buffers, _ = int_case(11, 40, 8, 4, "packed")
    fbuffers, _ = int_case(11, 40, -1, 3, "float")
    symbols, codes, offsets, table = sub1_case(11, 40, 4)
    lo_hi = lo_hi_float(log8_buffers(11))
    x, bias = torch.randn(3, 40), torch.randn(11)
    return [
        (torch.ops.moeconv.quant_linear.default, (x, buffers["qweight"], buffers["scales"], buffers["qzeros"], bias, 4, 8)),
        (torch.ops.moeconv.quant_linear.default, (x, fbuffers["qweight"], fbuffers["scales"], fbuffers["zeros"], None, 3, -1)),
        (torch.ops.moeconv.ternary_linear.default, (x, pack_bits(symbols, 2), lo_hi, bias)),
        (torch.ops.moeconv.sub1_linear.default, (x, codes, offsets, table, lo_hi, None, 4)),
    ]


def test_opcheck():
    torch.manual_seed(FIXED_SEED)
    for op, args in opcheck_samples():
        torch.library.opcheck(op, args)


@NATIVE
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_moeconv_cpu_isa_forces_the_quantized_path_too(isa):
    """MOECONV_CPU_ISA (read when the kernels load, in a fresh process) moves the quantized ops with the MoE ones."""
    code = (
        "import torch; from moeconv.kernels import native, quant_ops, quant_reference as R; "
        "from moeconv.quant.packing import pack_bits; torch.manual_seed(0); "
        "q = pack_bits(torch.randint(0, 16, (37, 320), dtype=torch.uint8), 4); s = torch.rand(37, 5).half(); "
        "x = torch.randn(1, 320); y = torch.ops.moeconv.quant_linear(x, q, s, None, None, 4, 64); "
        "w = R.quant_linear(x, q, s, None, None, 4, 64); "
        "print(native.cpu_isa(), float((y - w).abs().max() / (x.abs() @ R.int_weight(q, s, None, 4, 64, 320).abs().T).max()))"
    )
    env = {**os.environ, "MOECONV_CPU_ISA": isa, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == isa and float(out[1]) <= 2 * 322 * U, out  # the bound of the module docstring, relative to |W| |x|
