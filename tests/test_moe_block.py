"""The MoE block: fused kernel path equals the per-expert loop; routing semantics."""

from __future__ import annotations

import pytest
import torch

from moeconv.modeling.hf import moe_block
from moeconv.modeling.hf.moe_block import MoeconvMoeBlock, route


@pytest.mark.parametrize("activation,gated,bias", [("silu", True, False), ("gelu_pytorch_tanh", True, False),
                                                   ("gelu_new", False, True), ("relu", False, True)])
def test_fused_path_matches_loop(activation, gated, bias, monkeypatch):
    if moe_block._fused_moe_ffn is None:
        pytest.skip("moeconv.kernels not importable")
    seed = torch.seed()
    moe = dict(num_experts=6, top_k=2, expert_size=20, activation=activation, gated=gated, ffn_bias=bias, down_bias=bias)
    block = MoeconvMoeBlock(24, moe).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        fused = block(x)
        monkeypatch.setattr(moe_block, "_fused_moe_ffn", None)
        loop = block(x)
    assert torch.isfinite(fused).all()
    assert (fused - loop).norm() / loop.norm() < 1e-5, f"seed {seed}"


def test_route_scorings():
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5]])
    ids, w = route(logits, 2, "none", False)
    assert ids.tolist() == [[1, 3]] and w.tolist() == [[1.0, 1.0]]
    ids, w = route(logits, 2, "softmax", True)
    assert torch.allclose(w.sum(-1), torch.ones(1))
    ids, w = route(logits, 2, "sigmoid", False)
    assert torch.allclose(w, torch.sigmoid(torch.tensor([[2.0, 0.5]])))
