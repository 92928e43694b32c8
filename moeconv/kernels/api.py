"""The two public ops, checked before they reach torch.ops.moeconv: top-k routing and the fused expert feed-forward."""

from __future__ import annotations

import torch
from torch import Tensor

from moeconv.errors import MoeconvError
from moeconv.kernels import ops  # noqa: F401 - registers torch.ops.moeconv
from moeconv.kernels.reference import ACTIVATIONS, SCORINGS


class KernelInputError(MoeconvError):
    """Tensors of the wrong shape, dtype or device were passed to a moeconv kernel."""


def route(logits: Tensor, k: int, scoring: str = "none", renormalize: bool = False) -> tuple[Tensor, Tensor]:
    """Top-k experts per token (ties to the lower index).  logits [T, E] -> ids [T, k] int64, weights [T, k].

    scoring "none": weights are 1 (experts summed unscaled; k == E reproduces the dense FFN);
    "softmax": softmax over all E at the chosen experts; "sigmoid": sigmoid of the chosen logits.
    renormalize divides the k weights by their sum.
    """
    if logits.dim() != 2:
        raise KernelInputError(f"route: logits must be [T, E], got shape {tuple(logits.shape)}; flatten the tokens first")
    if scoring not in SCORINGS:
        raise KernelInputError(f"route: unknown scoring {scoring!r}; use one of {', '.join(SCORINGS)}")
    if not 1 <= k <= logits.shape[1]:
        raise KernelInputError(f"route: k={k} must be between 1 and the number of experts {logits.shape[1]}")
    if not logits.is_floating_point():
        raise KernelInputError(f"route: logits must be floating point, got {logits.dtype}")
    ids, weights = torch.ops.moeconv.route(logits, k, scoring, renormalize)
    return ids, weights


def moe_ffn(
    x: Tensor,
    ids: Tensor,
    weights: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    w_gate: Tensor | None = None,
    activation: str = "silu",
    b_up: Tensor | None = None,
    b_gate: Tensor | None = None,
) -> Tensor:
    """Σ_j weights[t, j] · expert_{ids[t, j]}(x[t]), shape of x ([..., d]) and x's dtype.

    Shapes: ids/weights [..., k]; w_up and w_gate [E, s, d]; w_down [E, d, s]; b_up/b_gate [E, s].
    Gated (w_gate given): down(act(gate x + b_gate) * (up x + b_up)); else down(act(up x + b_up)).
    activation: "silu" | "gelu_tanh" | "gelu" | "relu".  No down bias: add it once, outside.
    """
    _check_ffn(x, ids, weights, w_up, w_down, w_gate, activation, b_up, b_gate)
    d, k = x.shape[-1], ids.shape[-1]
    y = torch.ops.moeconv.moe_ffn(
        x.reshape(-1, d), ids.reshape(-1, k), weights.reshape(-1, k), w_gate, w_up, w_down, activation, b_gate, b_up
    )  # [T, d]
    return y.reshape(x.shape)


def _check_ffn(x, ids, weights, w_up, w_down, w_gate, activation, b_up, b_gate) -> None:
    if activation not in ACTIVATIONS:
        raise KernelInputError(f"moe_ffn: unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")
    if w_up.dim() != 3 or w_down.dim() != 3:
        raise KernelInputError("moe_ffn: expert weights must be stacked: w_up [E, s, d], w_down [E, d, s]")
    E, s, d = w_up.shape
    if x.shape[-1] != d or tuple(w_down.shape) != (E, d, s):
        raise KernelInputError(
            f"moe_ffn: x [..., {x.shape[-1]}], w_up {tuple(w_up.shape)} and w_down {tuple(w_down.shape)} disagree; "
            "expected x [..., d], w_up [E, s, d], w_down [E, d, s]"
        )
    if w_gate is not None and w_gate.shape != w_up.shape:
        raise KernelInputError(f"moe_ffn: w_gate {tuple(w_gate.shape)} must have w_up's shape {tuple(w_up.shape)}")
    for name, bias in (("b_up", b_up), ("b_gate", b_gate)):
        if bias is not None and tuple(bias.shape) != (E, s):
            raise KernelInputError(f"moe_ffn: {name} must be [E, s] = [{E}, {s}], got {tuple(bias.shape)}")
    if b_gate is not None and w_gate is None:
        raise KernelInputError("moe_ffn: b_gate given without w_gate; pass w_gate or drop b_gate")
    if ids.shape != weights.shape or ids.shape[:-1] != x.shape[:-1]:
        raise KernelInputError(
            f"moe_ffn: ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both be [..., k] for x {tuple(x.shape)}"
        )
    weights_dtypes = {t.dtype for t in (w_up, w_down, w_gate) if t is not None}
    if weights_dtypes != {x.dtype}:
        raise KernelInputError(f"moe_ffn: x is {x.dtype} but expert weights are {sorted(map(str, weights_dtypes))}; cast one")
    if ids.dtype != torch.int64:
        raise KernelInputError(f"moe_ffn: ids must be int64 (as route returns), got {ids.dtype}; use ids.long()")
    devices = {t.device for t in (x, ids, weights, w_up, w_down, w_gate, b_up, b_gate) if t is not None}
    if len(devices) != 1:
        raise KernelInputError(f"moe_ffn: all tensors must be on one device, got {sorted(map(str, devices))}")
