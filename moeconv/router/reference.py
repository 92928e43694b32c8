"""Un-fused reference MoE forward and the oracle expert importance, for metrics and tests."""

from __future__ import annotations

import torch
from torch import Tensor

from moeconv.ffn import DenseFFN


def expert_mask(assignment: Tensor, selected: Tensor) -> Tensor:
    """Per-token neuron mask from per-token expert selection: [T, E] 0/1 -> [T, d_ff]."""
    return selected[:, assignment]  # [T, d_ff]


def select_top_k(router: Tensor, x: Tensor, top_k: int) -> Tensor:
    """0/1 matrix [T, E] of the k experts with the highest router logits per token."""
    logits = x @ router.T  # [T, E]
    chosen = logits.topk(top_k, dim=1).indices  # [T, k]
    return torch.zeros_like(logits).scatter_(1, chosen, 1.0)


def moe_forward(ffn: DenseFFN, assignment: Tensor, router: Tensor, top_k: int, x: Tensor) -> Tensor:
    """MoE output with router scoring "none": the k selected experts are summed with weight 1.

    With top_k == E every neuron is kept and the result is ffn.forward(x).  [T, d] -> [T, d]
    """
    h = ffn.intermediate(x)  # [T, d_ff]
    selected = select_top_k(router.to(x.dtype), x, top_k)  # [T, E]
    masked = h * expert_mask(assignment, selected).to(h.dtype)  # [T, d_ff]
    return torch.nn.functional.linear(masked, ffn.down, ffn.down_bias)


def grouped_down(ffn: DenseFFN, assignment: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Neuron order grouping experts together, and each expert's down-projection Gram matrix.

    Returns (neuron_index [d_ff], gram [E, s, s]) with gram[e] = D_eᵀ D_e, D_e = down[:, expert e's neurons].
    """
    neuron_index = torch.argsort(assignment, stable=True)  # [d_ff]
    size = assignment.numel() // num_experts
    down = ffn.down.float()[:, neuron_index].T.reshape(num_experts, size, -1)  # [E, s, d]
    return neuron_index, down @ down.transpose(1, 2)  # [E, s, s]


def expert_importance_from_h(h: Tensor, neuron_index: Tensor, gram: Tensor) -> Tensor:
    """||y_e|| per token and expert, with y_e = h_e D_eᵀ, via the Gram matrices: [T, d_ff] -> [T, E]."""
    num_experts, size, _ = gram.shape
    grouped = h.float()[:, neuron_index].reshape(h.shape[0], num_experts, size).transpose(0, 1)  # [E, T, s]
    # ||h_e D_eᵀ||² = h_e G_e h_eᵀ costs T·d_ff·s instead of T·d_ff·d.
    energy = (torch.bmm(grouped, gram) * grouped).sum(dim=2)  # [E, T]
    return energy.T.clamp_min(0).sqrt()  # [T, E]


def expert_importance(ffn: DenseFFN, assignment: Tensor, x: Tensor) -> Tensor:
    """[T, E] norm of each expert's output contribution (the oracle router's score)."""
    num_experts = int(assignment.max()) + 1
    neuron_index, gram = grouped_down(ffn, assignment, num_experts)
    return expert_importance_from_h(ffn.intermediate(x), neuron_index, gram)


def oracle_selection(importance: Tensor, top_k: int) -> Tensor:
    """0/1 matrix [T, E] of the k experts with the largest output norm per token."""
    chosen = importance.topk(top_k, dim=1).indices  # [T, k]
    return torch.zeros_like(importance).scatter_(1, chosen, 1.0)


def relative_error(estimate: Tensor, target: Tensor) -> float:
    """||estimate - target||_F / ||target||_F."""
    return float((estimate - target).norm() / target.norm().clamp_min(1e-30))
