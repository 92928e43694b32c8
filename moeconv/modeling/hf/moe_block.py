"""The MoE block that replaces a dense FFN (self-contained: torch + transformers only).

Copied verbatim into every moeconv checkpoint so that it loads where moeconv is not installed.
When moeconv is installed and its native kernels are built, the fused op runs instead of the
per-expert loop below; both compute the same function.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

try:  # the fused kernels, present only where moeconv itself is installed
    from moeconv.kernels import fused_moe_ffn as _fused_moe_ffn
except Exception:  # noqa: BLE001 - any failure means: use the reference path
    _fused_moe_ffn = None
try:  # the whole block in one call at decode, where the installed moeconv has it (this file is copied into checkpoints)
    from moeconv.kernels import fused_moe_block as _fused_moe_block
except Exception:  # noqa: BLE001 - any failure means: the per-op path
    _fused_moe_block = None


class MoeconvExpert(nn.Module):
    """One expert: a slice of the dense FFN's neurons (gated or not)."""

    def __init__(self, hidden_size: int, size: int, gated: bool, bias: bool, activation: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, size, bias=bias) if gated else None
        self.up_proj = nn.Linear(hidden_size, size, bias=bias)
        self.down_proj = nn.Linear(size, hidden_size, bias=False)
        self.act = ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up_proj(x)
        h = self.act(h) if self.gate_proj is None else self.act(self.gate_proj(x)) * h
        return self.down_proj(h)


def route(logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert ids and their weights.  logits [T, E] -> ids [T, k], weights [T, k]."""
    if scoring == "none":  # selected experts summed with weight 1: top_k == E is the dense FFN
        ids = torch.topk(logits, top_k, dim=-1, sorted=True).indices
        return ids, torch.ones(ids.shape, dtype=logits.dtype, device=logits.device)
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    weights, ids = torch.topk(scores, top_k, dim=-1, sorted=True)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights


class MoeconvMoeBlock(nn.Module):
    """Router + experts (+ optional always-active shared expert, output bias and DAG aggregator)."""

    def __init__(self, hidden_size: int, moe: dict):
        super().__init__()
        self.num_experts = moe["num_experts"]
        self.top_k = moe["top_k"]
        self.scoring = moe.get("scoring", "none")
        self.renormalize = moe.get("renormalize", False)
        # False: call every expert as its own module (calibration hooks on expert Linears need that).
        self.use_fused_kernel = True
        self.activation = moe["activation"]
        expert_size, shared_size = moe["expert_size"], moe.get("shared_size", 0)
        gated, bias = moe.get("gated", True), moe.get("ffn_bias", False)
        self.router = nn.Linear(hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(
            MoeconvExpert(hidden_size, expert_size, gated, bias, self.activation) for _ in range(self.num_experts)
        )
        self.shared = MoeconvExpert(hidden_size, shared_size, gated, bias, self.activation) if shared_size else None
        self.down_bias = nn.Parameter(torch.zeros(hidden_size)) if moe.get("down_bias", False) else None
        # Which dense neuron went where: shared neurons first, then expert 0, 1, ... (provenance only).
        dense_size = shared_size + expert_size * self.num_experts
        self.register_buffer("neuron_index", torch.arange(dense_size), persistent=True)
        self.dag = None  # set by moeconv's DAG stage / the modeling code when config.moe["dag"] is given

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] -> ids [T, k], weights [T, k]."""
        return route(self.router(x), self.top_k, self.scoring, self.renormalize)

    def routed_outputs(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each selected expert's weighted output, one slot per choice.  [T, d] -> [T, k, d]"""
        if _fused_moe_ffn is not None and self.use_fused_kernel and not torch.is_grad_enabled():
            # The fused op sums a token's slots; one row per (token, slot) with k = 1 keeps them apart.
            per_slot = x.unsqueeze(1).expand(-1, self.top_k, -1).reshape(-1, x.shape[1])  # [T·k, d]
            fused = _fused_moe_ffn(self, per_slot, ids.reshape(-1, 1), weights.reshape(-1, 1))
            if fused is not None:
                return fused.view(x.shape[0], self.top_k, x.shape[1])
        out = x.new_zeros(x.shape[0], self.top_k, x.shape[1])
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero(ids == e, as_tuple=True)
            if token.numel():
                out[token, slot] = expert(x[token]) * weights[token, slot, None]
        return out

    def routed_sum(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sum of the selected experts' weighted outputs.  [T, d] -> [T, d]"""
        if _fused_moe_ffn is not None and self.use_fused_kernel and not torch.is_grad_enabled():
            fused = _fused_moe_ffn(self, x, ids, weights)
            if fused is not None:
                return fused
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero(ids == e, as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Decode: the whole block in one native call (the Python around the expert op cost as much as the op).
        # _fused_moe_ffn set to None (no moeconv here, or a test's reference run) turns this path off too.
        if (_fused_moe_block is not None and _fused_moe_ffn is not None and self.dag is None and self.use_fused_kernel
                and not torch.is_grad_enabled()):
            y = _fused_moe_block(self, hidden_states)
            if y is not None:
                return y
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, d]
        ids, weights = self.route(x)
        if self.dag is not None:
            y = self.dag(self.routed_outputs(x, ids, weights), x)
        else:
            y = self.routed_sum(x, ids, weights)
        if self.shared is not None:
            y = y + self.shared(x)
        if self.down_bias is not None:
            y = y + self.down_bias
        return y.reshape(shape)
