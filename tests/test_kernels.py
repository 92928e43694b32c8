"""Every route / moe_ffn implementation against the float64 reference on fresh random awkward inputs."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import moeconv.kernels as K
from moeconv.errors import MoeconvError
from moeconv.ffn import DenseFFN
from moeconv.kernels import build, native, ops, reference

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
# bf16 rounds the hidden activations (as torch's own bf16 reference does): measured normwise errors reach 9.7e-3
# for torch and 1.2e-2 for the gather + GEMM path on the smallest CASES (300-400 fresh seeds each; a 1e-2 bound
# failed ~1% of seeds on the 3x7 output). The fp32 runs of the same CASES (1e-5) are what catch logic errors: in
# bf16 a single lost token among 130 moves the normwise error by only 2.1e-2.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
CPU_ISAS = native.available_cpu_isas()
# CUDA cases are always collected, so a machine without a GPU reports them as skipped (and why).
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False")]
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]

# (name, device, isa, path); path 0 = auto, 1 = weight streaming (on CUDA: the GEMV kernels), 2 = gather + GEMM.
IMPLS = [("reference", "cpu", None, None)]
IMPLS += [(f"cpu-{isa}-{p}", "cpu", isa, n) for isa in CPU_ISAS for p, n in (("stream", 1), ("gemm", 2))]
IMPLS += [("cpu-auto", "cpu", None, 0)] if CPU_ISAS else []
IMPLS += [pytest.param(("cuda-native", "cuda", None, 0), marks=GPU, id="cuda-native")]
IMPLS += [pytest.param(("cuda-gemv", "cuda", None, 1), marks=GPU, id="cuda-gemv")]
IMPLS += [pytest.param(("cuda-gemm", "cuda", None, 2), marks=GPU, id="cuda-gemm")]
IMPLS += [pytest.param(("cuda-reference", "cuda", None, None), marks=GPU, id="cuda-reference")]


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (MOECONV_TEST_SEED=... reproduces a failure); printed in every message."""
    value = int(os.environ.get("MOECONV_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(value)
    return value


@contextmanager
def cpu_isa(isa: str | None):
    previous = native.set_cpu_isa(isa) if isa else None
    try:
        yield
    finally:
        if previous:
            native.set_cpu_isa(previous)


@contextmanager
def single_thread():
    """The float64 oracle needs no threads; on a crowded machine OpenMP barriers cost time slices."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Norm-wise relative error; NaN anywhere in `got` gives NaN, which fails every `<=` check."""
    got, want = got.double().cpu(), want.double().cpu()
    if not torch.isfinite(got).all():
        return float("nan")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def make_ids(T: int, E: int, k: int, routing: str) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(T, E)  # [T, E]
    if routing == "one":  # every token's first choice is expert E // 2
        logits[:, E // 2] = 100.0
    elif routing == "sparse":  # only k + 1 experts (if E allows) ever receive tokens
        keep = torch.randperm(E)[: min(E, k + 1)]
        mask = torch.full((E,), -1e4)
        mask[keep] = 0.0
        logits = logits + mask
    return K.route(logits, k, "softmax")


def make_problem(T, E, k, s, d, gated, bias, dtype, routing):
    scale = d**-0.5
    p = {
        "x": torch.randn(T, d).to(dtype),
        "w_up": (torch.randn(E, s, d) * scale).to(dtype),
        "w_down": (torch.randn(E, d, s) * s**-0.5).to(dtype),
        "w_gate": (torch.randn(E, s, d) * scale).to(dtype) if gated else None,
        "b_up": (torch.randn(E, s) * 0.1).to(dtype) if bias else None,
        "b_gate": (torch.randn(E, s) * 0.1).to(dtype) if bias and gated else None,
    }
    p["ids"], weights = make_ids(T, E, k, routing)
    p["weights"] = weights.to(dtype)
    return p


def expected(p, activation):
    """float64 reference of the (already rounded) inputs."""
    f64 = {n: (t.double() if t is not None and t.is_floating_point() else t) for n, t in p.items()}
    with single_thread():
        return reference.moe_ffn(
            f64["x"],
            f64["ids"],
            f64["weights"],
            f64["w_gate"],
            f64["w_up"],
            f64["w_down"],
            activation,
            f64["b_gate"],
            f64["b_up"],
        )


def run_impl(impl, p, activation) -> torch.Tensor:
    _, device, isa, path = impl
    q = {n: (t.to(device) if t is not None else None) for n, t in p.items()}
    out = torch.full_like(q["x"], float("nan"))  # poisoned: an unwritten element fails the check
    args = (q["x"], q["ids"], q["weights"], q["w_gate"], q["w_up"], q["w_down"], activation, q["b_gate"], q["b_up"])
    if path is None:
        out.copy_(reference.moe_ffn(*args))
    else:
        with cpu_isa(isa):
            ops.moe_ffn_into(out, *args, path=path)
    return out


# (T, E, k, s, d, gated, bias, activation, routing)
CASES = [
    (1, 8, 2, 40, 67, True, False, "silu", "random"),
    (7, 5, 3, 33, 50, False, True, "gelu_tanh", "random"),
    (37, 6, 6, 19, 29, True, True, "gelu", "random"),
    (70, 7, 1, 21, 48, True, False, "relu", "one"),  # > 64 pairs on one expert: several tiles
    (9, 12, 2, 3, 17, True, False, "silu", "sparse"),  # s < 4 rows; most experts idle
    (130, 10, 4, 24, 64, False, False, "relu", "sparse"),
    (3, 3, 3, 5, 7, True, True, "silu", "one"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}E{c[1]}k{c[2]}s{c[3]}d{c[4]}-{c[7]}-{c[8]}")
@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i[0])
def test_moe_ffn_matches_reference(impl, case, dtype, seed):
    T, E, k, s, d, gated, bias, activation, routing = case
    p = make_problem(T, E, k, s, d, gated, bias, dtype, routing)
    got = run_impl(impl, p, activation)
    err = rel_err(got, expected(p, activation))
    assert err <= TOL[dtype], f"{impl[0]} {case} {dtype}: rel err {err:.3e} > {TOL[dtype]} (seed {seed})"


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i[0])
def test_moe_ffn_every_k(impl, k, seed):
    p = make_problem(11, 5, k, 12, 20, True, False, torch.float32, "random")
    err = rel_err(run_impl(impl, p, "silu"), expected(p, "silu"))
    assert err <= 1e-5, f"{impl[0]} k={k}: rel err {err:.3e} (seed {seed})"


needs_bf16_dot = pytest.mark.skipif(
    "avx512bf16" not in CPU_ISAS, reason="CPU (or build) lacks avx512_bf16: the bf16 dot-product path cannot run here"
)


# (T, E, k, s, d): odd T, E not a power of 2, d and s off the 32-element vector (masked tails).
BF16_DOT_SHAPES = [(1, 3, 1, 1, 1), (5, 7, 7, 35, 33), (23, 6, 3, 64, 96), (17, 5, 2, 31, 130), (70, 3, 1, 9, 40)]


@needs_bf16_dot
@pytest.mark.parametrize("routing", ["random", "one", "sparse"])
@pytest.mark.parametrize("gated, bias, activation", [(True, False, "silu"), (False, True, "gelu_tanh"), (True, True, "relu")])
@pytest.mark.parametrize("shape", BF16_DOT_SHAPES, ids=lambda c: "T{}E{}k{}s{}d{}".format(*c))
def test_bf16_dot_path_matches_reference(shape, gated, bias, activation, routing, seed):
    """The AVX512-BF16 tile (4 rows x 1-4 tokens, masked tails, tree reduction) on awkward shapes."""
    T, E, k, s, d = shape
    p = make_problem(T, E, k, s, d, gated, bias, torch.bfloat16, routing)
    if routing == "one":
        assert int(p["ids"][:, 0].eq(E // 2).sum()) == T, "every token must reach expert E // 2"
    want = expected(p, activation)
    for path in (ops.PATH_STREAM, ops.PATH_AUTO):
        got = run_impl(("bf16dot", "cpu", "avx512bf16", path), p, activation)  # poisoned output
        err = rel_err(got, want)
        assert err <= TOL[torch.bfloat16], f"avx512bf16 path {path} {shape} {routing}: rel err {err:.3e} (seed {seed})"


@needs_bf16_dot
def test_bf16_dot_path_every_k_and_empty_experts(seed):
    T, E, s, d = 13, 6, 20, 45
    for k in range(1, E + 1):
        for routing in ("random", "sparse"):  # sparse leaves E - k - 1 experts without tokens
            p = make_problem(T, E, k, s, d, True, False, torch.bfloat16, routing)
            got = run_impl(("bf16dot", "cpu", "avx512bf16", ops.PATH_STREAM), p, "silu")
            err = rel_err(got, expected(p, "silu"))
            assert err <= TOL[torch.bfloat16], f"k={k} {routing}: rel err {err:.3e} (seed {seed})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_cpu_path_agrees(dtype, seed):
    """All vector paths this CPU has give the same answer (fp32: to rounding; bf16: within the bf16 bound)."""
    if not CPU_ISAS:
        pytest.skip("CPU kernels not loaded")
    p = make_problem(29, 7, 3, 37, 70, True, True, dtype, "random")
    outs = {isa: run_impl((isa, "cpu", isa, ops.PATH_STREAM), p, "silu") for isa in CPU_ISAS}
    base = outs["generic"]
    for isa, out in outs.items():
        err = rel_err(out, base)
        assert err <= (2e-6 if dtype == torch.float32 else TOL[dtype]), f"{isa} vs generic: {err:.3e} (seed {seed})"


def test_forced_cpu_isa_env_var_selects_the_generic_path(seed):
    """MOECONV_CPU_ISA=generic makes the dispatcher (and `moeconv env`) use the portable path."""
    if not native.cpu_build().loaded:
        pytest.skip("CPU kernels not loaded")
    script = (
        "import torch\n"
        "import moeconv.kernels as K\n"
        "from moeconv.kernels import native\n"
        "print(native.cpu_isa())\n"
        "print(K.kernel_status()['moe_ffn'])\n"
    )
    env = {**os.environ, native.CPU_ISA_ENV: "generic", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "generic" and "cpu: native generic [" in lines[1], lines


def test_unknown_forced_cpu_isa_raises_a_clear_error():
    if not native.cpu_build().loaded:
        pytest.skip("CPU kernels not loaded")
    with pytest.raises(MoeconvError, match="MOECONV_CPU_ISA='sse' is not a CPU kernel path"):
        native._force_cpu_isa("sse")
    with pytest.raises(RuntimeError, match="not available"):
        native.set_cpu_isa("avx1024")


@pytest.mark.parametrize("device", DEVICES)
def test_all_experts_with_unit_weights_is_the_dense_ffn(device, seed):
    """moeconv's default ("none" scoring, k == E) must reproduce the dense FFN it was cut from."""
    d, d_ff, E, T = 24, 60, 5, 13
    ffn = DenseFFN(up=torch.randn(d_ff, d), down=torch.randn(d, d_ff), act="silu", gate=torch.randn(d_ff, d))
    neurons = torch.randperm(d_ff).view(E, d_ff // E)  # [E, s]
    experts = [ffn.select(n) for n in neurons]
    x = torch.randn(T, d, device=device)
    ids, weights = K.route(torch.randn(T, E, device=device), E, "none")
    assert bool((weights == 1).all()), f"scoring none must give weight 1 (seed {seed})"
    y = K.moe_ffn(
        x,
        ids,
        weights,
        w_up=torch.stack([e.up for e in experts]).to(device),
        w_down=torch.stack([e.down for e in experts]).to(device),
        w_gate=torch.stack([e.gate for e in experts]).to(device),
    )
    err = rel_err(y, ffn.to(torch.float64).forward(x.double().cpu()))
    assert err <= 1e-5, f"k == E differs from the dense FFN: {err:.3e} (seed {seed})"


@pytest.mark.parametrize("scoring", ["none", "softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_route_matches_reference_with_ties(device, scoring, renormalize, seed):
    T, E = 53, 11
    logits = torch.randint(-3, 3, (T, E)).float()  # many ties: the lower index must win
    logits[0] = 1.0  # a row that is one big tie
    logits = logits.to(device)
    for k in (1, 4, E):
        ids = torch.full((T, k), -1, dtype=torch.int64, device=device)  # poisoned
        weights = torch.full((T, k), float("nan"), device=device)
        torch.ops.moeconv.route_out(logits, k, scoring, renormalize, ids=ids, weights=weights)
        want_ids, want_w = reference.route(logits.cpu().double(), k, scoring, renormalize)
        assert torch.equal(ids.cpu(), want_ids), f"{scoring} k={k}: ids differ (seed {seed})"
        assert rel_err(weights, want_w) <= 1e-6, f"{scoring} k={k}: weights differ (seed {seed})"
    assert K.route(logits, 3)[0][0].tolist() == [0, 1, 2], "an all-equal row must pick the lowest indices"


def test_route_bfloat16_and_nan_logits(seed):
    logits = torch.randn(33, 9)
    logits[4, 7] = float("nan")  # NaN ranks above every number (torch.sort's order)
    for dtype in (torch.float32, torch.bfloat16):
        ids, weights = K.route(logits.to(dtype), 2, "sigmoid")
        want_ids, want_w = reference.route(logits.to(dtype), 2, "sigmoid")
        assert torch.equal(ids, want_ids), f"{dtype}: ids differ (seed {seed})"
        assert weights.dtype == dtype and ids[4, 0].item() == 7, f"{dtype} (seed {seed})"
        keep = ~want_w.isnan()
        assert rel_err(weights[keep], want_w[keep]) <= TOL[dtype], f"{dtype}: weights differ (seed {seed})"


def test_public_ops_write_every_output_element(seed):
    p = make_problem(19, 6, 2, 16, 40, True, True, torch.float32, "random")
    out = torch.full_like(p["x"], float("nan"))
    torch.ops.moeconv.moe_ffn_out(
        p["x"], p["ids"], p["weights"], p["w_gate"], p["w_up"], p["w_down"], "silu", p["b_gate"], p["b_up"], out=out
    )
    assert rel_err(out, expected(p, "silu")) <= 1e-5, f"moe_ffn_out (seed {seed})"
    y = K.moe_ffn(
        p["x"][None], p["ids"][None], p["weights"][None], p["w_up"], p["w_down"], p["w_gate"], b_up=p["b_up"], b_gate=p["b_gate"]
    )  # [1, T, d]: leading dims are flattened and restored
    assert y.shape == (1, 19, 40) and torch.allclose(y[0], out, rtol=1e-5, atol=1e-6), f"seed {seed}"


def test_native_loads_where_a_compiler_exists():
    if not native.native_enabled() or not build.has_cxx_compiler():
        pytest.skip("native kernels disabled or no C++ compiler")
    assert native.cpu_build().loaded, native.cpu_build().how
    status = K.kernel_status()
    assert set(status) == {"route", "moe_ffn"} and "cpu: native" in status["moe_ffn"]


def _opcheck_samples(device: str):
    p = make_problem(6, 4, 2, 8, 12, True, True, torch.float32, "random")
    q = {n: (t.to(device) if t is not None else None) for n, t in p.items()}
    ffn = (q["x"], q["ids"], q["weights"], q["w_gate"], q["w_up"], q["w_down"], "gelu_tanh", q["b_gate"], q["b_up"])
    logits = torch.randn(6, 4, device=device)
    return [
        (torch.ops.moeconv.route.default, (logits, 2, "softmax", True), {}),
        (
            torch.ops.moeconv.route_out.default,
            (logits, 2, "none", False),
            {"ids": torch.empty(6, 2, dtype=torch.int64, device=device), "weights": torch.empty(6, 2, device=device)},
        ),
        (torch.ops.moeconv.moe_ffn.default, ffn, {}),
        (torch.ops.moeconv.moe_ffn_out.default, ffn, {"out": torch.empty_like(q["x"])}),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args, kwargs in _opcheck_samples(device):
        torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"activation": "swish"}, "unknown activation"),
        ({"w_down": torch.zeros(4, 11, 8)}, "disagree"),
        ({"ids": torch.zeros(6, 2, dtype=torch.int32)}, "int64"),
        ({"x": torch.zeros(6, 12, dtype=torch.float64)}, "cast one"),
        ({"b_up": torch.zeros(4, 9)}, "b_up must be"),
        ({"weights": torch.ones(6, 3)}, "must both be"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    p = make_problem(6, 4, 2, 8, 12, True, False, torch.float32, "random")
    args = {
        "x": p["x"],
        "ids": p["ids"],
        "weights": p["weights"],
        "w_up": p["w_up"],
        "w_down": p["w_down"],
        "w_gate": p["w_gate"],
        "activation": "silu",
        "b_up": None,
    }
    args.update(change)
    with pytest.raises(MoeconvError, match=message):
        K.moe_ffn(**args)
    with pytest.raises(MoeconvError, match="k=5"):
        K.route(torch.randn(3, 4), 5)


def test_out_of_range_expert_ids_fail_in_native_code():
    p = make_problem(4, 4, 2, 8, 12, True, False, torch.float32, "random")
    p["ids"][2, 1] = 4
    if not native.cpu_build().loaded:
        pytest.skip("CPU kernels not loaded")
    with pytest.raises(RuntimeError, match="out of range"):
        K.moe_ffn(p["x"], p["ids"], p["weights"], p["w_up"], p["w_down"], p["w_gate"])


def test_disabled_kernels_fall_back_and_build_recipe_is_standalone():
    """MOECONV_KERNELS=0 uses the reference; build.py imports without the rest of moeconv."""
    script = (
        "import importlib.util, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location('b', {str(REPO / 'moeconv/kernels/build.py')!r})\n"
        "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)\n"
        "exts = b.extension_modules()\n"
        "assert not any(m.startswith('moeconv') for m in sys.modules), 'build.py imported moeconv'\n"
        "print([e.name for e in exts])\n"
        "import moeconv.kernels as K\n"
        "print(K.kernel_status()['moe_ffn'])\n"
        "ids, w = K.route(torch.randn(5, 4), 2)\n"
        "print(K.moe_ffn(torch.randn(5, 8), ids, w, torch.randn(4, 3, 8), torch.randn(4, 8, 3)).shape)\n"
    )
    env = {**os.environ, "MOECONV_KERNELS": "0", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "moeconv.kernels._C" in lines[0] and "reference (disabled by MOECONV_KERNELS=0)" in lines[1], lines
    assert lines[2] == "torch.Size([5, 8])"
