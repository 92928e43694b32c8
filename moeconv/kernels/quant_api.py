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
