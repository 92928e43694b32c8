"""DAG-MoE aggregator: gated message passing among a token's k selected experts (torch only, self-contained)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class DagRound(nn.Module):
    """One round of gated all-pairs messages among the k expert nodes of each token.

    z_i = W_down·LN(x_i) + b_down                       [T, k, d] -> [T, k, d_g]
    (g_src, g_tgt, v_src, v_tgt) = W_pair·z + b_pair    one projection d_g -> 4·d_g per node
    m_i = Σ_j σ(g_src,i + g_tgt,j) ⊙ (v_src,i + v_tgt,j)   all pairs, i = j included
    update_i = W_up·m_i                                  W_up starts at zero

    Weights are plain Parameters, not nn.Linear, so that a transformers `_init_weights` pass
    (run when a model is built from its config) cannot overwrite the zero W_up.
    """

    def __init__(self, hidden_size: int, d_g: int):
        super().__init__()
        self.d_g = d_g
        # LayerNorm without affine: its scale and shift would fold into W_down and b_down.
        self.down_weight = nn.Parameter(torch.empty(d_g, hidden_size))
        self.down_bias = nn.Parameter(torch.empty(d_g))
        self.pair_weight = nn.Parameter(torch.empty(4 * d_g, d_g))
        self.pair_bias = nn.Parameter(torch.empty(4 * d_g))
        self.up_weight = nn.Parameter(torch.zeros(hidden_size, d_g))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """nn.Linear's default init (uniform ±1/sqrt(fan_in)) for W_down and W_pair; W_up = 0."""
        for weight, bias in ((self.down_weight, self.down_bias), (self.pair_weight, self.pair_bias)):
            bound = 1.0 / math.sqrt(weight.shape[1])
            for p in (weight, bias):
                noise = torch.rand(p.shape, generator=generator, dtype=torch.float32, device="cpu")
                p.copy_((noise * 2 - 1) * bound)
        self.up_weight.zero_()

    def messages(self, nodes: torch.Tensor) -> torch.Tensor:
        """Aggregated gated message per node, before W_up.  [T, k, d] -> [T, k, d_g]"""
        normed = F.layer_norm(nodes, nodes.shape[-1:])  # [T, k, d]
        z = F.linear(normed, self.down_weight, self.down_bias)  # [T, k, d_g]
        g_src, g_tgt, v_src, v_tgt = F.linear(z, self.pair_weight, self.pair_bias).chunk(4, dim=-1)  # 4 x [T, k, d_g]
        gate = torch.sigmoid(g_src.unsqueeze(2) + g_tgt.unsqueeze(1))  # [T, k(i), k(j), d_g]
        # Σ_j gate_ij ⊙ (v_src,i + v_tgt,j) = v_src,i ⊙ Σ_j gate_ij + Σ_j gate_ij ⊙ v_tgt,j.  A broadcast product,
        # not einsum: einsum lowers to T tiny batched matmuls, ~50x slower on CPU.
        return v_src * gate.sum(2) + (gate * v_tgt.unsqueeze(1)).sum(2)  # [T, k, d_g]


class DagAggregator(nn.Module):
    """Replaces the plain sum of a MoE layer's k weighted expert outputs by L rounds of DAG mixing.

    Nodes start at x_i⁰ = w_i·E_i(x) (+ x/k when `stabilize`); each round adds W_up·m_i to every
    node; the output is Σ_i x_iᴸ minus the x/k terms, i.e. plain MoE sum + Σ of all updates.
    With W_up = 0 (its initial value) the output equals the plain MoE sum exactly.

    All constructor keyword arguments are JSON values: they are stored in config.json as moe.dag.
    """

    def __init__(self, hidden_size: int, top_k: int, d_g: int = 24, rounds: int = 2, stabilize: bool = True):
        super().__init__()
        if d_g < 1 or rounds < 1 or top_k < 1:
            raise ValueError(f"DagAggregator needs d_g >= 1, rounds >= 1 and top_k >= 1 (got {d_g}, {rounds}, {top_k})")
        self.hidden_size = hidden_size
        self.top_k = top_k
        self.d_g = d_g
        self.stabilize = stabilize
        self.rounds = nn.ModuleList(DagRound(hidden_size, d_g) for _ in range(rounds))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for layer in self.rounds:
            layer.reset_parameters(generator)

    def forward(self, routed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """routed [T, k, d] (each selected expert's weighted output), x [T, d] (the block input) -> [T, d]"""
        if routed.shape[1:] != (self.top_k, self.hidden_size):
            raise ValueError(
                f"DagAggregator expects routed outputs [T, {self.top_k}, {self.hidden_size}], got {list(routed.shape)}"
            )
        out = routed.sum(1)  # [T, d]  the plain MoE output; the rounds only add to it
        nodes = routed + x.unsqueeze(1) / self.top_k if self.stabilize else routed  # [T, k, d]
        last = len(self.rounds) - 1
        for r, layer in enumerate(self.rounds):
            m = layer.messages(nodes)  # [T, k, d_g]
            if r < last:
                update = F.linear(m, layer.up_weight)  # [T, k, d]
                nodes = nodes + update
                out = out + update.sum(1)
            else:  # only the sum of the last updates is read, and Σ_i W_up·m_i = W_up·Σ_i m_i
                out = out + F.linear(m.sum(1), layer.up_weight)  # [T, d]
        return out

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, top_k={self.top_k}, d_g={self.d_g}, rounds={len(self.rounds)}, stabilize={self.stabilize}"
