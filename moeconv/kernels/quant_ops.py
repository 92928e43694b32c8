"""The torch.library ops moeconv::quant_linear / ternary_linear / sub1_linear / quant_moe_ffn: schemas, fake impls,
dispatch (quant_moe_ffn: a MoE step with quantized experts, all (token, expert) pairs in one call).

y [T, out] = x [T, in] W^T + bias, W in a stored format of docs/quant-formats.md (layout version 1, read as
stored). The CPU native kernels (csrc/cpu/quant_*.cpp) run for float32/bfloat16 x when loaded; otherwise, and on
other devices, the PyTorch reference (quant_reference.py). Inference only: no autograd formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moeconv.kernels import native, quant_reference

_lib = torch.library.Library("moeconv", "FRAGMENT")
_lib.define("quant_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int bits, int group_size) -> Tensor")
_lib.define("ternary_linear(Tensor x, Tensor qweight, Tensor lo_hi, Tensor? bias) -> Tensor")
_lib.define("quant_moe_ffn(Tensor x, Tensor ids, Tensor weights, Tensor[] gate, Tensor[] up, Tensor[] down, str kind, "
            "int bits, int group_size, int block_rows, str activation) -> Tensor")
_lib.define("sub1_linear(Tensor x, Tensor codes, Tensor block_offsets, Tensor dictionary, Tensor lo_hi, Tensor? bias, "
            "int block_rows) -> Tensor")


def _native(x: Tensor) -> bool:
    return x.device.type == "cpu" and native.has_native(x.device, x.dtype)


def _out(x: Tensor, rows: int) -> Tensor:
    return torch.empty(x.shape[0], rows, dtype=x.dtype, device=x.device)


def _quant_linear(x, qweight, scales, zeros, bias, bits, group_size) -> Tensor:
    if not _native(x):
        return quant_reference.quant_linear(x, qweight, scales, zeros, bias, bits, group_size)
    out = _out(x, qweight.shape[0])
    torch.ops.moeconv_C.quant_linear_out(x, qweight, scales, zeros, bias, bits, group_size, out)
    return out


def _ternary_linear(x, qweight, lo_hi, bias) -> Tensor:
    if not _native(x):
        return quant_reference.ternary_linear(x, qweight, lo_hi, bias)
    out = _out(x, qweight.shape[0])
    torch.ops.moeconv_C.ternary_linear_out(x, qweight, lo_hi, bias, out)
    return out


def _sub1_linear(x, codes, block_offsets, dictionary, lo_hi, bias, block_rows) -> Tensor:
    if not _native(x):
        return quant_reference.sub1_linear(x, codes, block_offsets, dictionary, lo_hi, bias, block_rows)
    out = _out(x, lo_hi.shape[0])
    torch.ops.moeconv_C.sub1_linear_out(x, codes, block_offsets, dictionary, lo_hi, bias, block_rows, out)
    return out


def _quant_moe_ffn(x, ids, weights, gate, up, down, kind, bits, group_size, block_rows, activation) -> Tensor:
    if not _native(x):
        return quant_reference.quant_moe_ffn(x, ids, weights, gate, up, down, kind, bits, group_size, block_rows, activation)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    torch.ops.moeconv_C.quant_moe_ffn_out(x, ids, weights, gate, up, down, kind, bits, group_size, block_rows, activation, out)
    return out


for _device in ("CPU", "CUDA"):
    _lib.impl("quant_moe_ffn", _quant_moe_ffn, _device)
    _lib.impl("quant_linear", _quant_linear, _device)
    _lib.impl("ternary_linear", _ternary_linear, _device)
    _lib.impl("sub1_linear", _sub1_linear, _device)


@torch.library.register_fake("moeconv::quant_linear")
def _quant_linear_fake(x, qweight, scales, zeros, bias, bits, group_size) -> Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.register_fake("moeconv::ternary_linear")
def _ternary_linear_fake(x, qweight, lo_hi, bias) -> Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.register_fake("moeconv::sub1_linear")
def _sub1_linear_fake(x, codes, block_offsets, dictionary, lo_hi, bias, block_rows) -> Tensor:
    return x.new_empty(x.shape[0], lo_hi.shape[0])


@torch.library.register_fake("moeconv::quant_moe_ffn")
def _quant_moe_ffn_fake(x, ids, weights, gate, up, down, kind, bits, group_size, block_rows, activation) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)
