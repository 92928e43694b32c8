"""Packing of QuantizedTensors into the stored buffers of each format, and back (layouts: docs/quant-formats.md)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from moeconv.config import QuantSpec
from moeconv.errors import CheckpointError, RecipeError
from moeconv.modeling.hf.quant_linear import (
    INT_BITS,
    SUB1_BLOCK_ROWS,
    buffer_specs,
    chunk_layout,
    decode_sub1,
    lo_hi_of,
    log8_levels,
    sub1_block_rows,
    sub1_index_name,
    unpack_bits,
)
from moeconv.quant import sub1
from moeconv.quant.grids import LO_HI_DTYPE, SCALE_DTYPE, QuantizedTensor


@dataclass
class PackedWeight:
    """Stored form of one quantized matrix: `buffers` go to safetensors, `fmt` to config.json's `quant` entry."""

    fmt: dict
    buffers: dict[str, Tensor]

    @property
    def num_weights(self) -> int:
        return int(self.fmt["in_features"]) * int(self.fmt["out_features"])

    def stored_bits(self, include_dictionary: bool = True) -> int:
        """All stored bits: codes, scales/zeros or lo/hi, block offsets and (unless excluded) the sub1 dictionary."""
        return sum(
            t.numel() * t.element_size() * 8 for name, t in self.buffers.items() if include_dictionary or name != "dictionary"
        )

    def bits_per_weight(self, include_dictionary: bool = True) -> float:
        return self.stored_bits(include_dictionary) / self.num_weights


def stored_bits_of_format(fmt: Mapping, include_dictionary: bool = True) -> int:
    """Stored bits of a matrix from its format dict alone (every buffer of buffer_specs; a shared sub1 dictionary
    is stored once per model, so it is left out here, as PackedWeight.stored_bits(False) does)."""
    shared = bool(fmt.get("shared_dictionary", False))
    total = 0
    for name, (shape, dtype) in buffer_specs(fmt).items():
        if name == "dictionary" and (shared or not include_dictionary):
            continue
        total += math.prod(shape) * dtype.itemsize * 8
    return total


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [..., n] (each < 2^bits) -> uint8 [..., packed_bytes(n, bits)]; inverse of unpack_bits."""
    values, nbytes = chunk_layout(bits)
    n = codes.shape[-1]
    pad = -n % values
    padded = torch.nn.functional.pad(codes.long(), (0, pad))  # zero codes fill the last chunk
    chunks = padded.reshape(*codes.shape[:-1], -1, values)  # [..., n_chunks, values]
    value_shifts = torch.arange(0, bits * values, bits, device=codes.device)
    words = (chunks << value_shifts).sum(dim=-1, keepdim=True)  # [..., n_chunks, 1]
    byte_shifts = torch.arange(0, 8 * nbytes, 8, device=codes.device)
    packed = (words >> byte_shifts) & 255  # [..., n_chunks, nbytes]
    return packed.reshape(*codes.shape[:-1], -1).to(torch.uint8)


def format_dict(spec: QuantSpec, out_features: int, in_features: int) -> dict:
    """The format dict (without sub1's stream sizes) of a matrix quantized with `spec`."""
    fmt = {"format": spec.format, "in_features": in_features, "out_features": out_features}
    if spec.is_ternary:
        fmt["lo_hi"] = "log8"
    else:
        fmt.update(group_size=spec.group_size, symmetric=spec.symmetric)
        if spec.float_zeros:
            fmt["float_zeros"] = True
    return fmt


def pack(q: QuantizedTensor, dictionary: sub1.Sub1Dictionary | None = None, shared_dictionary: bool = False,
         block_rows: int = SUB1_BLOCK_ROWS) -> PackedWeight:
    """Pack `q` in the format of its spec. sub1 uses `dictionary` (built from `q` itself when None), coding
    `block_rows` rows per block; `shared_dictionary` marks it as stored once per model (see QuantLinear.attach_dictionary)."""
    spec = q.spec
    out_features, in_features = q.shape
    fmt = format_dict(spec, out_features, in_features)
    if spec.is_ternary:
        lo_hi = _lo_hi_buffers(q, fmt)
        if spec.bits == "ternary":
            return PackedWeight(fmt, {"qweight": pack_bits(q.codes, 2), **lo_hi})
        dictionary = dictionary or sub1.build_dictionary(sub1.pair_counts(q.codes))
        codes, block_offsets = sub1.encode(q.codes, dictionary, block_rows)
        fmt.update(num_codes=codes.numel(), dictionary_size=dictionary.size, shared_dictionary=shared_dictionary,
                   block_rows=block_rows)
        buffers = {"codes": codes, "block_offsets": block_offsets, **lo_hi, "dictionary": dictionary.table}
        return PackedWeight(fmt, buffers)
    assert q.scales is not None
    bits = int(spec.bits)
    buffers = {"qweight": pack_bits(q.codes, bits), "scales": q.scales.to(SCALE_DTYPE)}
    if q.zeros is not None and spec.float_zeros:
        buffers["zeros"] = q.zeros.to(SCALE_DTYPE)
    elif q.zeros is not None:
        buffers["qzeros"] = pack_bits(q.zeros.to(torch.uint8), bits)
    return PackedWeight(fmt, buffers)


def _lo_hi_buffers(q: QuantizedTensor, fmt: dict) -> dict[str, Tensor]:
    """Stored lo/hi of a ternary matrix: 8-bit codes on the tensor's log grid (q.scales = its magnitude range, from
    grids.find_params), or bf16 values when q carries no range (an older checkpoint being re-packed)."""
    assert q.lo_hi is not None
    if q.scales is None:
        del fmt["lo_hi"]
        return {"lo_hi": q.lo_hi.to(LO_HI_DTYPE)}
    mag_range = q.scales[0].float() if q.scales.shape[0] else torch.zeros(2)  # [2] (smallest, largest)
    if not bool((q.scales == mag_range).all()):
        raise RecipeError("ternary rows of one tensor carry different lo/hi ranges; quantize the tensor as a whole")
    return {"lo_hi_codes": log8_codes(q.lo_hi, mag_range), "lo_hi_range": mag_range.clone()}


def log8_codes(lo_hi: Tensor, mag_range: Tensor) -> Tensor:
    """uint8 [rows, 2] codes of |lo|, |hi| (lo_hi [rows, 2]) on the log8 grid of `mag_range` [2]; each value must be
    exactly a level of that grid (grids.find_params makes them so), else RecipeError."""
    levels = log8_levels(*mag_range.tolist())  # [256]
    mags = torch.stack([-lo_hi[:, 0], lo_hi[:, 1]], dim=1).float().cpu().contiguous()  # [rows, 2]
    codes = (torch.searchsorted(levels[1:], mags) + 1).clamp(max=levels.numel() - 1)
    codes = torch.where(mags == 0, 0, codes)
    if not torch.equal(levels[codes], mags):
        raise RecipeError("ternary lo/hi are not levels of their tensor's log8 grid; make them with grids.find_params")
    return codes.to(torch.uint8)


def unpack(buffers: Mapping[str, Tensor], fmt: Mapping) -> QuantizedTensor:
    """QuantizedTensor from stored buffers; raises CheckpointError when they do not match `fmt`."""
    try:
        expected = buffer_specs(fmt)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"quantization format entry {dict(fmt)} is invalid ({exc}); re-run moeconv quantize") from exc
    for name, (shape, dtype) in expected.items():
        tensor = buffers.get(name)
        if tensor is None or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            got = "missing" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"
            raise CheckpointError(f"quantized buffer {name!r} is {got}, expected {shape} {dtype}; re-run moeconv quantize")
    name, rows, cols = fmt["format"], int(fmt["out_features"]), int(fmt["in_features"])
    if name in INT_BITS:
        spec = QuantSpec(INT_BITS[name], int(fmt["group_size"]), bool(fmt.get("symmetric", False)), bool(fmt.get("float_zeros", False)))
        scales = buffers["scales"].float()
        if spec.float_zeros:
            zeros = buffers["zeros"].float()
        else:
            zeros = None if spec.symmetric else unpack_bits(buffers["qzeros"], spec.bits, scales.shape[1]).float()
        return QuantizedTensor(spec, unpack_bits(buffers["qweight"], spec.bits, cols), scales=scales, zeros=zeros)
    try:
        lo_hi = lo_hi_of(buffers, fmt)  # [rows, 2]
    except ValueError as exc:
        raise CheckpointError(f"quantized lo/hi buffers are corrupt ({exc}); re-run moeconv quantize") from None
    mag_range = buffers["lo_hi_range"].float().expand(rows, 2).clone() if "lo_hi_range" in expected else None
    if name == "ternary":
        return QuantizedTensor(QuantSpec("ternary"), unpack_bits(buffers["qweight"], 2, cols), scales=mag_range, lo_hi=lo_hi)
    try:
        symbols = decode_sub1(buffers["codes"], buffers["dictionary"], rows, cols)
    except (ValueError, IndexError) as exc:
        raise CheckpointError(f"sub1 code stream is corrupt ({exc}); re-run moeconv quantize") from exc
    sub1.check_block_offsets(buffers["codes"], buffers["dictionary"], buffers[sub1_index_name(fmt)], rows, cols,
                             sub1_block_rows(fmt))
    return QuantizedTensor(QuantSpec("sub1"), symbols, scales=mag_range, lo_hi=lo_hi)
