"""Pure-PyTorch reference implementations of the moeconv ops; also the fallback when no native build exists."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SCORINGS = ("none", "softmax", "sigmoid")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")


def activation_fn(name: str, x: Tensor) -> Tensor:
    """The elementwise activation `name` (one of ACTIVATIONS) applied to x."""
    if name == "silu":
        return F.silu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def route(logits: Tensor, k: int, scoring: str = "none", renormalize: bool = False) -> tuple[Tensor, Tensor]:
    """Top-k experts per token.  logits [T, E] -> ids [T, k] int64, weights [T, k] (logits' dtype).

    Experts are ranked by logit, largest first; equal logits rank the lower index first and NaN
    ranks above every number (torch.sort's order), so the choice is deterministic.
    Weights: "none" -> 1 (experts summed unscaled), "softmax" -> softmax over all E logits taken
    at the chosen experts, "sigmoid" -> sigmoid of the chosen logits; `renormalize` then divides
    by their sum over the k chosen (so "none" + renormalize gives 1/k).
    """
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {SCORINGS}")
    T, E = logits.shape
    if not 1 <= k <= E:
        raise ValueError(f"k={k} must be between 1 and the number of experts {E}")
    # A stable descending sort keeps equal logits in index order: ties go to the lower index.
    ids = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]  # [T, k]
    if scoring == "none":
        weights = torch.ones(T, k, dtype=torch.float32, device=logits.device)
    elif scoring == "softmax":
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        weights = probs.gather(1, ids)  # [T, k]
    else:
        weights = torch.sigmoid(logits.float().gather(1, ids))  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights.to(logits.dtype)


def moe_ffn(
    x: Tensor,
    ids: Tensor,
    weights: Tensor,
    w_gate: Tensor | None,
    w_up: Tensor,
    w_down: Tensor,
    activation: str = "silu",
    b_gate: Tensor | None = None,
    b_up: Tensor | None = None,
) -> Tensor:
    """Sum over the k chosen experts of weights[t, j] * expert_{ids[t, j]}(x[t]).  -> [T, d] in x's dtype.

    x [T, d]; ids [T, k] int64; weights [T, k]; w_gate/w_up [E, s, d]; w_down [E, d, s]; b_gate/b_up [E, s].
    Gated expert: down(act(gate x + b_gate) * (up x + b_up)); non-gated (w_gate None): down(act(up x + b_up)).
    Matmuls run in the weights' dtype; the k contributions are summed in float32.
    """
    T, d = x.shape
    E = w_up.shape[0]
    out = torch.zeros(T, d, dtype=torch.float32, device=x.device)  # [T, d]
    flat_ids = ids.reshape(-1)  # [T*k]
    flat_tokens = torch.arange(T, device=x.device).repeat_interleave(ids.shape[1])  # [T*k]
    flat_weights = weights.reshape(-1).float()  # [T*k]
    for e in range(E):
        pairs = (flat_ids == e).nonzero().squeeze(1)  # [n_e]
        if pairs.numel() == 0:
            continue
        tokens = flat_tokens.index_select(0, pairs)  # [n_e]
        xe = x.index_select(0, tokens)  # [n_e, d]
        up = F.linear(xe, w_up[e], None if b_up is None else b_up[e])  # [n_e, s]
        if w_gate is None:
            h = activation_fn(activation, up)
        else:
            gate = F.linear(xe, w_gate[e], None if b_gate is None else b_gate[e])  # [n_e, s]
            h = activation_fn(activation, gate) * up
        ye = F.linear(h, w_down[e])  # [n_e, d]
        out.index_add_(0, tokens, ye.float() * flat_weights.index_select(0, pairs)[:, None])
    return out.to(x.dtype)
