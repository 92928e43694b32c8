"""Bridge from a MoeconvMoeBlock (per-expert nn.Linear modules) to the fused moe_ffn op."""

from __future__ import annotations

import torch
from torch import Tensor

from moeconv.kernels import native
from moeconv.kernels.api import moe_ffn

# transformers' ACT2FN names -> the activations the fused op implements
ACTIVATION_NAMES = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                    "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def _stack(block) -> dict[str, Tensor | None] | None:
    """Expert weights stacked as [E, ...], cached on the block until any expert weight changes."""
    experts = list(block.experts)
    params = [p for e in experts for p in e.parameters()]
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
    cached = getattr(block, "_moeconv_stacked", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    first = experts[0]
    stacked = {
        "w_up": torch.stack([e.up_proj.weight for e in experts]),  # [E, s, d]
        "w_down": torch.stack([e.down_proj.weight for e in experts]),  # [E, d, s]
        "w_gate": torch.stack([e.gate_proj.weight for e in experts]) if first.gate_proj is not None else None,
        "b_up": torch.stack([e.up_proj.bias for e in experts]) if first.up_proj.bias is not None else None,
        "b_gate": torch.stack([e.gate_proj.bias for e in experts])
        if first.gate_proj is not None and first.gate_proj.bias is not None else None,
    }
    object.__setattr__(block, "_moeconv_stacked", (key, stacked))  # plain attribute: not a buffer, not saved
    return stacked


def fused_moe_ffn(block, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor | None:
    """Σ of the selected experts' weighted outputs through the native op, or None when it cannot run
    here (no native build for this device/dtype, quantized experts, an activation it lacks)."""
    activation = ACTIVATION_NAMES.get(block.activation)
    if activation is None or not native.has_native(x.device, x.dtype):
        return None
    if not all(isinstance(getattr(e.up_proj, "weight", None), torch.Tensor) for e in block.experts):
        return None  # quantized experts dequantize in their own modules
    w = _stack(block)
    if w["w_up"].dtype != x.dtype:
        return None
    return moe_ffn(x, ids, weights.to(x.dtype), w["w_up"], w["w_down"], w_gate=w["w_gate"], activation=activation,
                   b_up=w["b_up"], b_gate=w["b_gate"])
