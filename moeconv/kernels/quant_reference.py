"""Pure-PyTorch reference of the quantized linear ops (also their fallback), written from docs/quant-formats.md.

Self-contained on purpose: moeconv.modeling.hf.quant_linear imports the kernels, so the kernels cannot import it;
tests/test_quant_kernels.py checks that these weights equal quant_linear.dequantize_buffers bit for bit.
Every weight is dequantized in float32 as `(code - zero) * scale` (intN) or `{0, lo, hi}[symbol]` (ternary,
sub1), then y = x W^T + b in float32, cast to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moeconv.kernels.reference import activation_fn

SUB1_LENGTH_SHIFT = 56
SUB1_SLOTS = 28  # symbols an entry can hold


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """uint8 [rows, bytes] packed little-endian per chunk -> int64 codes [rows, n]."""
    values, nbytes = (8, 3) if bits == 3 else (8 // bits, 1)
    rows = packed.shape[0]
    chunks = packed.reshape(rows, -1, nbytes).long()  # [rows, n_chunks, nbytes]
    words = (chunks << torch.arange(0, 8 * nbytes, 8, device=packed.device)).sum(-1, keepdim=True)
    codes = (words >> torch.arange(0, bits * values, bits, device=packed.device)) & (2**bits - 1)
    return codes.reshape(rows, -1)[:, :n]


def int_weight(qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int, cols: int) -> Tensor:
    """fp32 [out, in]: zeros None = symmetric (2^(bits-1)), uint8 = packed integer zero points, float16 = float ones."""
    rows, n_groups = scales.shape
    codes = unpack_codes(qweight, bits, cols).float()  # [out, in]
    if zeros is None:
        z = torch.full((rows, n_groups), float(2 ** (bits - 1)), device=scales.device)
    elif zeros.dtype == torch.uint8:
        z = unpack_codes(zeros, bits, n_groups).float()
    else:
        z = zeros.float()
    group = cols if group_size == -1 else group_size
    grouped = codes.reshape(rows, n_groups, group)  # [out, n_groups, G]
    return ((grouped - z[..., None]) * scales.float()[..., None]).reshape(rows, cols)


def ternary_weight(symbols: Tensor, lo_hi: Tensor) -> Tensor:
    """fp32 [out, in] of ternary symbols [out, in] (0 -> 0, 1 -> lo, 2 -> hi, 3 -> 0) and lo_hi [out, 2]."""
    lo_hi = lo_hi.float()
    table = torch.cat([torch.zeros_like(lo_hi[:, :1]), lo_hi, torch.zeros_like(lo_hi[:, :1])], dim=1)  # [out, 4]
    return table.gather(1, symbols.long())


def sub1_symbols(codes: Tensor, block_offsets: Tensor, dictionary: Tensor, rows: int, cols: int, block_rows: int) -> Tensor:
    """Ternary symbols [rows, cols] of a sub1 stream; ValueError when a block does not decode to its rows."""
    if codes.numel() and int(codes.long().max()) >= dictionary.numel():
        raise ValueError(f"sub1 code {int(codes.long().max())} is outside the {dictionary.numel()}-entry dictionary")
    padded = cols + cols % 2
    entries = dictionary[codes.long()]  # [n]
    counts = 2 * ((entries >> SUB1_LENGTH_SHIFT) & 15)  # symbols per code
    starts = block_offsets.long().tolist() + [codes.numel()]
    for b in range(len(starts) - 1):
        want = (min(rows, (b + 1) * block_rows) - b * block_rows) * padded
        if not 0 <= starts[b] <= starts[b + 1] <= codes.numel() or int(counts[starts[b]:starts[b + 1]].sum()) != want:
            raise ValueError(f"sub1 block {b} does not decode to its {want} symbols")
    slots = torch.arange(0, 2 * SUB1_SLOTS, 2, device=codes.device)
    symbols = (entries[:, None] >> slots) & 3  # [n, 28]
    flat = symbols[slots[None, :] < 2 * counts[:, None]]
    return flat.reshape(rows, padded)[:, :cols]


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x.float(), weight, None if bias is None else bias.float()).to(x.dtype)


def quant_linear(x, qweight, scales, zeros, bias, bits: int, group_size: int) -> Tensor:
    return _linear(x, int_weight(qweight, scales, zeros, bits, group_size, x.shape[-1]), bias)


def ternary_linear(x, qweight, lo_hi, bias) -> Tensor:
    return _linear(x, ternary_weight(unpack_codes(qweight, 2, x.shape[-1]), lo_hi), bias)


def sub1_linear(x, codes, block_offsets, dictionary, lo_hi, bias, block_rows: int) -> Tensor:
    symbols = sub1_symbols(codes, block_offsets, dictionary, lo_hi.shape[0], x.shape[-1], block_rows)
    return _linear(x, ternary_weight(symbols, lo_hi), bias)


PER_EXPERT = {"int": 3, "ternary": 2, "sub1": 4}  # tensors per expert and projection in quant_moe_ffn's lists


def expert_linear(kind: str, tensors: list[Tensor], e: int, x: Tensor, bits: int, group_size: int, block_rows: int) -> Tensor:
    """Projection of expert e (its PER_EXPERT[kind] tensors in `tensors`; an empty int zeros tensor = symmetric)."""
    t = tensors[PER_EXPERT[kind] * e : PER_EXPERT[kind] * (e + 1)]
    if kind == "int":
        return quant_linear(x, t[0], t[1], t[2] if t[2].numel() else None, None, bits, group_size)
    if kind == "ternary":
        return ternary_linear(x, t[0], t[1], None)
    return sub1_linear(x, t[0], t[1], t[2], t[3], None, block_rows)


def quant_moe_ffn(x, ids, weights, gate, up, down, kind: str, bits: int, group_size: int, block_rows: int,
                  activation: str) -> Tensor:
    """sum_j weights[t, j] down_e(act(gate_e x) * up_e x) (non-gated: down_e(act(up_e x))), e = ids[t, j], in float32."""
    xf, out = x.float(), torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        xe = xf[tok]  # [n, d]
        h = expert_linear(kind, up, e, xe, bits, group_size, block_rows)
        g = activation_fn(activation, expert_linear(kind, gate, e, xe, bits, group_size, block_rows) if gate else h)
        y = expert_linear(kind, down, e, g * h if gate else g, bits, group_size, block_rows)
        out.index_add_(0, tok, y * weights[tok, slot].float()[:, None])
    return out.to(x.dtype)
