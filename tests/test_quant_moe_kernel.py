"""moeconv::quant_moe_ffn (a MoE step with quantized experts, all (token, expert) pairs in one call) on every CPU path
against its PyTorch reference and against a loop over the experts' QuantLinear modules (their pure-PyTorch path).

Tolerance: relative 1e-5 on the worst token. Each projection's float32 sums differ from the reference's only in order (at most
2 (n + 2) 2^-24 |W| |x| per output, n <= 41 here: < 5e-6 of |W| |x|); the activation (|silu'| <= 1.1) and the down
projection carry that through at most twice, and |W| |x| stays within a few |y| on these random experts. A lost or
doubled (token, expert) pair moves its token by more than 1e-2 (checked), 1000 times the tolerance."""

from __future__ import annotations

import pytest
import torch
from test_quant_kernels import CPU_ISAS, cpu_isa, int_case, log8_buffers, sub1_case, ternary_symbols

import moeconv.modeling.hf.quant_linear as ql
from moeconv.kernels import quant_api, quant_reference
from moeconv.modeling.hf.quant_linear import QuantLinear
from moeconv.quant.packing import pack_bits

NATIVE = pytest.mark.skipif(not CPU_ISAS, reason="moeconv CPU kernels are not built")
D, S, E, K = 41, 24, 5, 2  # 41 and 24: not multiples of the vector width


class Expert(torch.nn.Module):
    def __init__(self, gate, up, down):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down


def projection(kind: str, rows: int, cols: int) -> QuantLinear:
    if kind.startswith("int"):
        bits, zero_mode, group = {"int4": (4, "packed", -1), "int8": (8, "symmetric", -1), "int2": (2, "float", -1)}[kind]
        buffers, fmt = int_case(rows, cols, group, bits, zero_mode)
        return QuantLinear.from_packed(buffers, fmt)
    if kind == "ternary":
        fmt = {"format": "ternary", "in_features": cols, "out_features": rows, "lo_hi": "log8"}
        return QuantLinear.from_packed({"qweight": pack_bits(ternary_symbols(rows, cols), 2), **log8_buffers(rows)}, fmt)
    _, codes, offsets, table = sub1_case(rows, cols, 8)
    fmt = {"format": "sub1", "in_features": cols, "out_features": rows, "lo_hi": "log8", "num_codes": codes.numel(),
           "dictionary_size": table.numel(), "shared_dictionary": False, "block_rows": 8}
    return QuantLinear.from_packed({"codes": codes, "block_offsets": offsets, "dictionary": table, **log8_buffers(rows)}, fmt)


def experts(kind: str, gated: bool) -> list[Expert]:
    return [Expert(projection(kind, S, D) if gated else None, projection(kind, S, D), projection(kind, D, S)) for _ in range(E)]


def loop(x, ids, weights, found, activation="silu") -> torch.Tensor:
    """The experts' QuantLinear modules on the pure-PyTorch path, pair by pair."""
    out = torch.zeros(x.shape)
    act = {"silu": torch.nn.functional.silu, "relu": torch.relu}[activation]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            ex = found[int(ids[t, j])]
            u = ex.up_proj(x[t : t + 1].float())
            h = act(ex.gate_proj(x[t : t + 1].float())) * u if ex.gate_proj is not None else act(u)
            out[t] += weights[t, j].float() * ex.down_proj(h)[0]
    return out


def rel(got, want) -> float:
    """The worst token's relative error (a lost pair cannot hide among many tokens)."""
    got, want = got.double(), want.double()
    return ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()


@NATIVE
@pytest.mark.parametrize("kind", ["int4", "int8", "int2", "ternary", "sub1"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_quant_moe_ffn_matches_the_expert_loop(kind, gated, monkeypatch):
    torch.manual_seed(7)
    found = experts(kind, gated)
    for T in (1, 3, 17):
        x = torch.randn(T, D)
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])  # [T, K] distinct experts per token
        weights = torch.rand(T, K) * 0.5 + 0.5
        with monkeypatch.context() as m:
            m.setattr(ql, "_native_linear", None)
            with torch.no_grad():
                want = loop(x, ids, weights, found)
        lost = weights.clone()
        lost[T // 2, 0] = 0.0
        with monkeypatch.context() as m:
            m.setattr(ql, "_native_linear", None)
            with torch.no_grad():
                assert rel(loop(x, ids, lost, found), want) > 1e-2, "a lost pair must fail the check"
        for isa in CPU_ISAS:
            with cpu_isa(isa), torch.no_grad():
                got = quant_api.quantized_moe_ffn(x, ids, weights, found, "silu")
            assert got is not None and rel(got, want) <= 1e-5, f"{kind} gated={gated} T={T} isa={isa}"
        with torch.no_grad():
            got16 = quant_api.quantized_moe_ffn(x.bfloat16(), ids, weights.bfloat16(), found, "silu")
            with monkeypatch.context() as m:
                m.setattr(ql, "_native_linear", None)
                want16 = loop(x.bfloat16().float(), ids, weights.bfloat16().float(), found)  # the inputs the op sees
        assert got16.dtype == torch.bfloat16 and rel(got16, want16) <= 2.0**-8 + 1e-5  # + the output's bf16 rounding


def test_quant_moe_ffn_reference_and_opcheck():
    torch.manual_seed(8)
    found = experts("int4", True)
    x, ids, weights = torch.randn(3, D), torch.tensor([[0, 4], [2, 0], [4, 1]]), torch.rand(3, K)
    lists = [sum((quant_api.expert_tensors(getattr(e, name))[1] for e in found), []) for name in ("gate_proj", "up_proj", "down_proj")]
    args = (x, ids, weights, *lists, "int", 4, -1, 1, "silu")
    with torch.no_grad():
        assert rel(quant_reference.quant_moe_ffn(*args), loop(x, ids, weights, found)) <= 1e-5
    torch.library.opcheck(torch.ops.moeconv.quant_moe_ffn.default, args)


@NATIVE
def test_quant_moe_ffn_steps_aside_for_mixed_experts():
    torch.manual_seed(9)
    found = experts("int4", True)
    found[1] = experts("ternary", True)[1]
    assert quant_api.quantized_moe_ffn(torch.randn(2, D), torch.tensor([[0, 1], [1, 2]]), torch.rand(2, K), found, "silu") is None
    with pytest.raises(RuntimeError, match="expert ids must be in"):
        ok = experts("int4", True)
        lists = [sum((quant_api.expert_tensors(getattr(e, n))[1] for e in ok), []) for n in ("gate_proj", "up_proj", "down_proj")]
        torch.ops.moeconv_C.quant_moe_ffn_out(torch.randn(1, D), torch.tensor([[0, E]]), torch.rand(1, K), *lists, "int", 4, -1,
                                              1, "silu", torch.empty(1, D))


@NATIVE
def test_quant_moe_ffn_steps_aside_for_prefill():
    """Past MAX_TOKENS tokens each expert's QuantLinear dequantizes once and runs a GEMM instead (faster there)."""
    found = experts("int4", True)
    many = quant_api.MAX_TOKENS + 1
    ids = torch.randint(0, E, (many, K), generator=torch.Generator().manual_seed(0))
    assert quant_api.quantized_moe_ffn(torch.randn(many, D), ids, torch.rand(many, K), found, "silu") is None
    assert quant_api.quantized_moe_ffn(torch.randn(4, D), ids[:4], torch.rand(4, K), found, "silu") is not None
