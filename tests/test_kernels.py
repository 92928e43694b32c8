"""Every route / moe_ffn implementation against an oracle written here, on random awkward inputs: each test runs on a
fixed seed and on the run's fresh seed (MOECONV_TEST_SEED, printed in the session header and in every message)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import moeconv.kernels as K
from conftest import KERNEL_SEED
from moeconv.errors import MoeconvError
from moeconv.ffn import DenseFFN
from moeconv.kernels import native, ops, reference

HAS_CUDA = torch.cuda.is_available()
# fp32 runs are checked against the float64 oracle at 1e-5 (normwise). bf16 runs on the CPU are checked, token by token,
# against an oracle that rounds to bf16 exactly where the kernel does (csrc/cpu: streaming tiles keep h in fp32, the
# AVX512-BF16 tile rounds h, the gather + GEMM path rounds every ATen op). Measured over 120 seeds of CASES on every CPU
# path: the worst token is off by 3.0e-3, while losing one (token, expert) pair puts a token off by at least 6.5e-2;
# every bf16 check also proves that a lost pair fails it. The CUDA kernels' rounding is not modelled here: they keep the
# float64 oracle at 2e-2 normwise (a lost token among 130 moved that by only 2.1e-2).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
CUDA_BF16_TOL = 2e-2
FIXED_SEED = 20240607
CPU_ISAS = native.available_cpu_isas()
# CUDA cases are always collected, so a machine without a GPU reports them as skipped (and why).
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False")]
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]

# (name, device, isa, path); path 0 = auto, 1 = weight streaming (on CUDA: the GEMV kernels), 2 = gather + GEMM.
IMPLS = [("reference", "cpu", None, None)]
IMPLS += [(f"cpu-{isa}-{p}", "cpu", isa, n) for isa in CPU_ISAS for p, n in (("stream", 1), ("gemm", 2))]
IMPLS += [("cpu-auto", "cpu", None, 0)] if CPU_ISAS else []
IMPLS += [pytest.param((f"cuda-{name}", "cuda", None, path), marks=GPU, id=f"cuda-{name}")
          for name, path in (("native", 0), ("gemv", 1), ("gemm", 2), ("reference", None))]


@pytest.fixture(params=[FIXED_SEED, KERNEL_SEED], ids=["fixed-seed", "fresh-seed"])
def seed(request) -> int:
    """The fixed seed, then this run's fresh one (MOECONV_TEST_SEED=... replays it); named in every message."""
    torch.manual_seed(request.param)
    return request.param


@contextmanager
def cpu_isa(isa: str | None):
    previous = native.set_cpu_isa(isa) if isa else None
    try:
        yield
    finally:
        if previous:
            native.set_cpu_isa(previous)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Norm-wise relative error; NaN anywhere in `got` gives NaN, which fails every `<=` check."""
    got, want = got.double().cpu(), want.double().cpu()
    if not torch.isfinite(got).all():
        return float("nan")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def token_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """The worst token's relative error (NaN if `got` has one): a lost pair cannot hide among many tokens."""
    got, want = got.double().cpu(), want.double().cpu()
    if not torch.isfinite(got).all():
        return float("nan")
    return ((got - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-30)).max().item()


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


ACTIVATION = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}


def to_bf16(t: torch.Tensor) -> torch.Tensor:
    """Round (through fp32, as the kernels compute) to the nearest bf16, kept in float64."""
    return t.float().bfloat16().double()


def expected(p, activation, rounding: str = "none", drop: tuple[int, int] | None = None) -> torch.Tensor:
    """The MoE feed-forward in float64 on the (already rounded) inputs, written out here, not moeconv's reference.

    rounding says where the result is rounded to bf16, as each bf16 kernel does (csrc/cpu/*.cpp): "none" (float64 out);
    "out" (streaming tiles: fp32 dots, h and accumulator, bf16 output); "h+out" (the AVX512-BF16 tile also rounds h);
    "ops" (gather + GEMM, moe_ops.cpp gemm_path: every ATen op on bf16 rounds, bias added after the matmul);
    "ops-fused-bias" (torch's F.linear adds the bias before rounding). `drop` = (token, slot): that pair is lost."""
    f = {n: (t.double() if t is not None and t.is_floating_point() else t) for n, t in p.items()}
    weights = f["weights"].clone()
    if drop is not None:
        weights[drop] = 0.0
    ops_round = to_bf16 if rounding.startswith("ops") else (lambda v: v)
    act = ACTIVATION[activation]
    out = torch.zeros_like(f["x"])  # [T, d]

    def linear(x, w, b):  # x [n, in] @ w [out, in].T + b [out]
        y = x @ w.T
        if b is None:
            return ops_round(y)
        return ops_round(ops_round(y) + b) if rounding == "ops" else ops_round(y + b)

    bias = lambda name, e: None if f[name] is None else f[name][e]  # noqa: E731
    for e in range(f["w_up"].shape[0]):
        tokens, slots = (f["ids"] == e).nonzero(as_tuple=True)  # [n_e]
        x = f["x"][tokens]  # [n_e, d]
        up = linear(x, f["w_up"][e], bias("b_up", e))  # [n_e, s]
        h = act(up) if f["w_gate"] is None else ops_round(act(linear(x, f["w_gate"][e], bias("b_gate", e)))) * up
        h = to_bf16(h) if rounding == "h+out" else ops_round(h)
        out.index_add_(0, tokens, linear(h, f["w_down"][e], None) * weights[tokens, slots][:, None])
    return out if rounding == "none" else to_bf16(out)


def roundings(impl) -> list[str]:
    """How the bf16 result of `impl` is rounded; the auto path may take either of its CPU paths."""
    _, device, isa, path = impl
    if path is None:
        return ["ops-fused-bias"]
    if path == ops.PATH_STREAM:
        return ["h+out" if isa == "avx512bf16" else "out"]
    return ["ops"] if path == 2 else ["out", "h+out", "ops"]


def check(impl, p, activation, what: str, seed: int) -> None:
    """got vs the oracle that rounds as impl does; on bf16 CPU runs, also proof that one lost pair would fail it."""
    got = run_impl(impl, p, activation)
    if p["x"].dtype == torch.float32 or impl[1] == "cuda":
        tol = TOL[torch.float32] if p["x"].dtype == torch.float32 else CUDA_BF16_TOL
        err = rel_err(got, expected(p, activation))
        assert err <= tol, f"{impl[0]} {what}: rel err {err:.3e} > {tol} (seed {seed})"
        return
    err = min(token_err(got, expected(p, activation, r)) for r in roundings(impl))
    assert err <= TOL[torch.bfloat16], f"{impl[0]} {what}: a token off by {err:.3e} > {TOL[torch.bfloat16]} (seed {seed})"
    token = int(torch.randint(p["x"].shape[0], ()))  # its first choice, the largest routing weight, is lost
    r = roundings(impl)[0]
    if token_err(expected(p, activation, r, drop=(token, 0))[token:token + 1], expected(p, activation, r)[token:token + 1]) \
            <= 2 * TOL[torch.bfloat16]:
        return  # that pair adds (next to) nothing, e.g. a dead ReLU: losing it cannot show
    lost = min(token_err(got, expected(p, activation, r, drop=(token, 0))) for r in roundings(impl))
    assert lost > TOL[torch.bfloat16], f"{impl[0]} {what}: a lost pair (token {token}) gives only {lost:.3e} (seed {seed})"


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
    check(impl, make_problem(T, E, k, s, d, gated, bias, dtype, routing), activation, f"{case} {dtype}", seed)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}E{c[1]}k{c[2]}s{c[3]}d{c[4]}-{c[7]}-{c[8]}")
def test_a_kernel_that_loses_one_pair_fails_the_bf16_check(case, seed):
    """The bf16 tolerance is tight enough: the kernel run with one token's first choice dropped is caught."""
    T, E, k, s, d, gated, bias, activation, routing = case
    impl = next((i for i in IMPLS if i[0] == "cpu-auto"), IMPLS[0])
    p = make_problem(T, E, k, s, d, gated, bias, torch.bfloat16, routing)
    token = int(torch.randint(T, ()))
    lossy = {**p, "weights": p["weights"].clone()}
    lossy["weights"][token, 0] = 0.0  # as if the kernel never routed the pair
    got = run_impl(impl, lossy, activation)
    assert min(token_err(got, expected(lossy, activation, r)) for r in roundings(impl)) <= TOL[torch.bfloat16]
    err = min(token_err(got, expected(p, activation, r)) for r in roundings(impl))
    assert err > TOL[torch.bfloat16], f"{impl[0]} {case}: losing token {token}'s pair is off by only {err:.3e} (seed {seed})"


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
    for path in (ops.PATH_STREAM, ops.PATH_AUTO):
        check(("bf16dot", "cpu", "avx512bf16", path), p, activation, f"path {path} {shape} {routing}", seed)


@needs_bf16_dot
def test_bf16_dot_path_every_k_and_empty_experts(seed):
    T, E, s, d = 13, 6, 20, 45
    for k in range(1, E + 1):
        for routing in ("random", "sparse"):  # sparse leaves E - k - 1 experts without tokens
            p = make_problem(T, E, k, s, d, True, False, torch.bfloat16, routing)
            check(("bf16dot", "cpu", "avx512bf16", ops.PATH_STREAM), p, "silu", f"k={k} {routing}", seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_cpu_path_agrees(dtype, seed):
    """All vector paths this CPU has agree: fp32 with the generic path to rounding, bf16 each with its rounding oracle."""
    if not CPU_ISAS:
        pytest.skip("CPU kernels not loaded")
    p = make_problem(29, 7, 3, 37, 70, True, True, dtype, "random")
    base = run_impl(("generic", "cpu", "generic", ops.PATH_STREAM), p, "silu")
    for isa in CPU_ISAS:
        if dtype == torch.bfloat16:
            check((isa, "cpu", isa, ops.PATH_STREAM), p, "silu", "T29E7k3s37d70", seed)
        else:
            err = rel_err(run_impl((isa, "cpu", isa, ops.PATH_STREAM), p, "silu"), base)
            assert err <= 2e-6, f"{isa} vs generic: {err:.3e} (seed {seed})"


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
    stacked = {f"w_{n}": torch.stack([getattr(e, n) for e in experts]).to(device) for n in ("up", "down", "gate")}
    y = K.moe_ffn(x, ids, weights, **stacked)
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


def _opcheck_samples(device: str):
    p = make_problem(6, 4, 2, 8, 12, True, True, torch.float32, "random")
    q = {n: (t.to(device) if t is not None else None) for n, t in p.items()}
    ffn = (q["x"], q["ids"], q["weights"], q["w_gate"], q["w_up"], q["w_down"], "gelu_tanh", q["b_gate"], q["b_up"])
    logits = torch.randn(6, 4, device=device)
    return [
        (torch.ops.moeconv.route.default, (logits, 2, "softmax", True), {}),
        (torch.ops.moeconv.route_out.default, (logits, 2, "none", False),
         {"ids": torch.empty(6, 2, dtype=torch.int64, device=device), "weights": torch.empty(6, 2, device=device)}),
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
    args = dict(x=p["x"], ids=p["ids"], weights=p["weights"], w_up=p["w_up"], w_down=p["w_down"], w_gate=p["w_gate"],
                activation="silu", b_up=None)
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
