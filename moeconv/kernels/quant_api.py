"""QuantLinear's native path (moeconv.modeling.hf.quant_linear imports this inside try/except, so a checkpoint that
runs without moeconv keeps its pure-PyTorch path; both compute y = x W^T + b with the same float32 weights).

quantized_linear returns None wherever the kernels do not apply, and the caller then dequantizes and calls F.linear:
not on the CPU, x neither float32 nor bfloat16, the CPU kernels not built (native.py logs why, once), autograd
needed, more than MAX_TOKENS tokens (prefill: one dequantization + a GEMM wins there), or buffers in other dtypes
than the stored ones (e.g. a model cast with .to(dtype) made the float16 scales bfloat16).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moeconv.kernels import native, quant_ops  # noqa: F401 - quant_ops registers torch.ops.moeconv.*_linear

INT_BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}
# Tokens per call up to which the kernels run (decode, small batches: each packed weight is read once per call).
# Past some size dequantizing once and calling the float GEMM wins; at 1536x576 int4 g64, one thread, the kernel still
# took 1.5 ms at 64 tokens against 4.1 ms for dequantize + GEMM (a noisy shared machine; larger T not measured).
MAX_TOKENS = 64


def quantized_linear(module, x: Tensor) -> Tensor | None:
    """y [..., out] of a QuantLinear `module` (its fmt, buffers, bias, lo_hi_float()) by the native ops, or None."""
    tokens = x.numel() // max(x.shape[-1], 1)
    if x.device.type != "cpu" or x.dtype not in native.NATIVE_DTYPES or tokens > MAX_TOKENS or tokens == 0:
        return None
    if not native.cpu_build().loaded or (torch.is_grad_enabled() and x.requires_grad):
        return None
    fmt, buffers = module.fmt, module._buffers
    bias = None if module.bias is None else module.bias.detach()
    x2 = x.reshape(tokens, x.shape[-1])  # [T, in]
    name = fmt["format"]
    if name in INT_BITS:
        zeros = buffers.get("qzeros", buffers.get("zeros"))
        if buffers["scales"].dtype != torch.float16 or (zeros is not None and zeros.dtype not in (torch.uint8, torch.float16)):
            return None
        group = int(fmt.get("group_size", -1))
        y = torch.ops.moeconv.quant_linear(x2, buffers["qweight"], buffers["scales"], zeros, bias, INT_BITS[name], group)
    elif name == "ternary":
        y = torch.ops.moeconv.ternary_linear(x2, buffers["qweight"], module.lo_hi_float(), bias)
    else:
        offsets = buffers.get("block_offsets", buffers.get("row_offsets"))
        y = torch.ops.moeconv.sub1_linear(x2, buffers["codes"], offsets, module.dictionary, module.lo_hi_float(), bias,
                                          int(fmt.get("block_rows", 1)))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def expert_tensors(module) -> tuple[str, list[Tensor]]:
    """(kind, the tensors quant_moe_ffn takes for this QuantLinear projection: quant_reference.PER_EXPERT)."""
    name, buffers = module.fmt["format"], module._buffers
    if name in INT_BITS:
        zeros = buffers.get("qzeros", buffers.get("zeros"))
        return "int", [buffers["qweight"], buffers["scales"], zeros if zeros is not None else buffers["scales"].new_empty(0)]
    if name == "ternary":
        return "ternary", [buffers["qweight"], module.lo_hi_float()]
    offsets = buffers.get("block_offsets", buffers.get("row_offsets"))
    return "sub1", [buffers["codes"], offsets, module.dictionary, module.lo_hi_float()]


def quantized_moe_ffn(x: Tensor, ids: Tensor, weights: Tensor, experts, activation: str) -> Tensor | None:
    """y [T, d] = sum_j weights[t, j] expert_{ids[t, j]}(x[t]) in one moeconv::quant_moe_ffn call, for experts (a
    sequence of modules with QuantLinear gate_proj (or None), up_proj, down_proj, all of one format and no bias);
    None when the experts do not fit that (mixed formats, biases) or the kernels do not apply (as quantized_linear)."""
    probe = experts[0].up_proj
    if x.shape[0] > MAX_TOKENS:  # prefill: each expert's QuantLinear dequantizes once and runs a GEMM, which wins there
        return None
    if (x.device.type != "cpu" or x.dtype not in native.NATIVE_DTYPES
                                      or not native.cpu_build().loaded or (torch.is_grad_enabled() and x.requires_grad)):
        return None
    fmt = {k: v for k, v in probe.fmt.items() if k in ("format", "group_size", "symmetric", "float_zeros", "block_rows")}
    lists: dict[str, list[Tensor]] = {"gate_proj": [], "up_proj": [], "down_proj": []}
    kind = ""
    for expert in experts:
        for name, found in lists.items():
            module = getattr(expert, name, None)
            if module is None and name == "gate_proj":
                continue
            same = {k: v for k, v in getattr(module, "fmt", {}).items() if k in fmt}
            if same != fmt or getattr(module, "bias", None) is not None:
                return None
            kind, tensors = expert_tensors(module)
            found.extend(tensors)
    if lists["gate_proj"] and len(lists["gate_proj"]) != len(lists["up_proj"]):
        return None
    bits = INT_BITS.get(fmt["format"], 2)
    return torch.ops.moeconv.quant_moe_ffn(x, ids, weights, lists["gate_proj"], lists["up_proj"], lists["down_proj"], kind,
                                           bits, int(fmt.get("group_size", -1)), int(fmt.get("block_rows", 1)), activation)
