"""The fused path packs a block's experts once: weights stored once, and every change to them reaches the kernel.

Each test compares the fused output with the per-expert loop (the reference) after one kind of change that a
user or a moeconv stage makes to a model between two inference calls.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeconv.kernels.block import packed_expert_weights
from moeconv.modeling.hf import moe_block
from moeconv.modeling.hf.moe_block import MoeconvExpert, MoeconvMoeBlock

pytestmark = pytest.mark.skipif(moe_block._fused_moe_ffn is None, reason="moeconv.kernels not importable")
MOE = dict(num_experts=5, top_k=2, expert_size=12, activation="silu", gated=True, ffn_bias=True)


def _block(seed: int = 0) -> MoeconvMoeBlock:
    torch.manual_seed(seed)
    block = MoeconvMoeBlock(16, MOE).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block


def _fused_and_loop(block: MoeconvMoeBlock, x: torch.Tensor, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        fused = block(x)
        with monkeypatch.context() as m:
            m.setattr(moe_block, "_fused_moe_ffn", None)
            loop = block(x)
    return fused, loop


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool((a.float() - b.float()).norm() <= tol * b.float().norm())


def test_experts_are_views_of_one_stack():
    block = _block()
    with torch.no_grad():
        stacks = packed_expert_weights(block)
    w_up = stacks["w_up"]  # [E, s, d]
    for e, expert in enumerate(block.experts):
        assert expert.up_proj.weight.data_ptr() == w_up[e].data_ptr()  # no second copy
        assert expert.up_proj.weight.untyped_storage().data_ptr() == w_up.untyped_storage().data_ptr()
    assert stacks["b_up"].shape == (5, 12) and stacks["w_down"].shape == (5, 16, 12)


def test_in_place_edits_reach_the_kernel(monkeypatch):
    block, x = _block(), torch.randn(7, 16)
    before, _ = _fused_and_loop(block, x, monkeypatch)
    with torch.no_grad():
        block.experts[1].up_proj.weight.mul_(2.0)
        block.experts[3].gate_proj.bias.add_(0.5)
    fused, loop = _fused_and_loop(block, x, monkeypatch)
    assert not torch.allclose(before, fused)
    assert _close(fused, loop)


def test_load_state_dict_reaches_the_kernel(monkeypatch):
    block, x = _block(0), torch.randn(7, 16)
    _fused_and_loop(block, x, monkeypatch)  # packs
    block.load_state_dict(_block(1).state_dict())
    fused, loop = _fused_and_loop(block, x, monkeypatch)
    assert _close(fused, loop) and _close(loop, _fused_and_loop(_block(1), x, monkeypatch)[1])
    block.load_state_dict(_block(2).state_dict(), assign=True)  # replaces the Parameter objects
    fused, loop = _fused_and_loop(block, x, monkeypatch)
    assert _close(fused, loop)


def test_dtype_change_and_swapped_expert_repack(monkeypatch):
    block, x = _block(), torch.randn(7, 16)
    _fused_and_loop(block, x, monkeypatch)
    block.to(torch.bfloat16)  # every Parameter gets new data
    fused, loop = _fused_and_loop(block, x.bfloat16(), monkeypatch)
    assert fused.dtype == torch.bfloat16 and _close(fused, loop, 2e-2)  # bf16: 8-bit mantissa, a few roundings
    block.to(torch.float32)
    fresh = MoeconvExpert(16, 12, True, True, "silu")
    torch.nn.init.normal_(fresh.up_proj.weight, std=1.0)
    block.experts[2] = fresh
    fused, loop = _fused_and_loop(block, x, monkeypatch)
    assert _close(fused, loop)
    assert block.experts[2].up_proj.weight.data_ptr() == packed_expert_weights(block)["w_up"][2].data_ptr()


def test_training_updates_the_packed_weights(monkeypatch):
    block, x = _block(), torch.randn(7, 16)
    _fused_and_loop(block, x, monkeypatch)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    block.train()
    block(x).square().mean().backward()  # grad mode: the per-expert path, gradients into the packed views
    assert all(p.grad is not None for p in block.experts.parameters() if p.requires_grad)
    opt.step()
    block.eval()
    fused, loop = _fused_and_loop(block, x, monkeypatch)
    assert _close(fused, loop)


def test_packed_block_saves_and_reloads(tmp_path, monkeypatch):
    block, x = _block(), torch.randn(7, 16)
    fused, _ = _fused_and_loop(block, x, monkeypatch)
    save_file({k: v.contiguous() for k, v in block.state_dict().items()}, str(tmp_path / "b.safetensors"))
    other = MoeconvMoeBlock(16, MOE).eval()
    other.load_state_dict(load_file(str(tmp_path / "b.safetensors")))
    assert torch.equal(_fused_and_loop(other, x, monkeypatch)[0], fused)


@pytest.mark.parametrize("kind", ["int4", "ternary", "sub1"])
def test_quantized_experts_take_one_quantized_moe_call(kind, monkeypatch):
    """A block whose experts are QuantLinear modules: the fused path is one moeconv::quant_moe_ffn call per step, equal
    to the per-expert loop on the pure-PyTorch path (tolerance as in tests/test_quant_moe_kernel.py)."""
    from test_quant_kernels import CPU_ISAS
    from test_quant_moe_kernel import D, E, K, experts

    import moeconv.modeling.hf.quant_linear as ql
    from moeconv.kernels import block as block_module

    if not CPU_ISAS:
        pytest.skip("moeconv CPU kernels are not built")
    torch.manual_seed(3)
    block = MoeconvMoeBlock(D, dict(num_experts=E, top_k=K, expert_size=24, activation="silu", gated=True)).eval()
    for mine, quantized in zip(block.experts, experts(kind, gated=True), strict=True):
        mine.gate_proj, mine.up_proj, mine.down_proj = quantized.gate_proj, quantized.up_proj, quantized.down_proj
    calls = []
    real = block_module.quantized_moe_ffn
    monkeypatch.setattr(block_module, "quantized_moe_ffn", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(6, D)
    with torch.no_grad():
        fused = block(x)
        second = block(x)  # the unpackable experts are remembered, and still computed
        monkeypatch.setattr(moe_block, "_fused_moe_ffn", None)
        monkeypatch.setattr(ql, "_native_linear", None)
        loop = block(x)
    assert len(calls) == 2 and torch.equal(fused, second)
    assert ((fused - loop).norm(dim=-1) / loop.norm(dim=-1)).max() < 1e-5


def test_packing_under_inference_mode_leaves_trainable_parameters(monkeypatch):
    """eval/generate run under torch.inference_mode: the packed Parameters must stay ordinary tensors that a later
    heal or dag step can train (requires_grad_ and backward)."""
    block, x = _block(), torch.randn(7, 16)
    with torch.inference_mode():
        block(x)
    weights = [p for p in block.experts.parameters()]
    assert not any(p.is_inference() for p in weights) and not packed_expert_weights(block)["w_up"].is_inference()
    for p in weights:
        p.requires_grad_(True)
    block.train()
    block(x).square().mean().backward()
    assert all(p.grad is not None for p in weights)


def test_float_experts_of_mixed_dtypes_step_aside_then_pack_once_unified(monkeypatch):
    from moeconv.kernels.block import fused_moe_ffn

    block, x = _block(), torch.randn(7, 16)
    ids, weights = block.route(x)
    block.experts[1].to(torch.float64)  # a user's surgery: one expert in another dtype
    with torch.no_grad():
        assert fused_moe_ffn(block, x, ids, weights) is None  # not packed, not mistaken for quantized experts
    block.experts[1].to(torch.float32)
    fused, loop = _fused_and_loop(block, x, monkeypatch)
    assert _close(fused, loop)
    assert block.experts[1].up_proj.weight.data_ptr() == packed_expert_weights(block)["w_up"][1].data_ptr()
