"""Quantization grids (intN with per-group scales, QMoE ternary per row), round-to-nearest and dequantization."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from moeconv.config import ClipSearch, QuantSpec
from moeconv.errors import RecipeError
from moeconv.modeling.hf.quant_linear import LOG8_STEPS, log8_levels

# Stored dtypes: these are also the precisions the grids round their parameters to, so that
# what GPTQ measures while quantizing is exactly what the checkpoint later reproduces.
SCALE_DTYPE = torch.float16
LO_HI_DTYPE = torch.bfloat16  # the older ternary lo/hi storage; ternary grids now use 8-bit log codes (log8_grid)
_SMALLEST_SCALE = 2.0**-24  # smallest fp16 subnormal: a scale below it would round to 0


@dataclass
class QuantizedTensor:
    """A quantized [out, in] matrix in unpacked form.

    codes: [out, in] uint8 — intN levels 0..2^b-1, or ternary symbols {0: 0, 1: lo, 2: hi}.
    scales: [out, n_groups] fp32 holding fp16 values (intN), else None.
    zeros: [out, n_groups] fp32 zero points (asymmetric intN): integers, or fp16 values with float_zeros; else None.
    lo_hi: [out, 2] fp32 (lo, hi) per row (ternary), else None.
    For ternary, `scales` is [out, 2]: the (smallest, largest) nonzero lo/hi magnitude of the tensor whose log8 grid
    lo_hi lies on (the same on every row, so a row slice keeps it; see log8_grid), or None for bf16 lo_hi (older
    checkpoints).
    """

    spec: QuantSpec
    codes: Tensor
    scales: Tensor | None = None
    zeros: Tensor | None = None
    lo_hi: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]


def find_params(w: Tensor, spec: QuantSpec, clip: ClipSearch | None = None, col_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Grid parameters of each row of `w` [..., rows, k] (one group): (scale, zero) for intN, (lo, hi) for ternary.

    Both are fp32 [..., rows], already rounded to their stored precision. `clip` searches shrunk ranges (intN
    only); `col_weight`, broadcastable against `w` (e.g. diag(H) as [..., 1, k]), weights each column's squared
    error in that search. Ternary lo/hi are rounded to the log8 grid of their tensor (log8_grid): a tensor is `w`
    [..., rows, 1, k] (the group axis of size 1, as quantize_rtn and GPTQ pass it) or a plain [rows, k].
    """
    w = w.float()
    if spec.float_zeros:  # the exact range: no need for 0 to be a grid point
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [..., rows]
    else:
        lo = w.amin(dim=-1).clamp(max=0.0)  # [..., rows]
        hi = w.amax(dim=-1).clamp(min=0.0)
    if spec.is_ternary:
        lo_hi, _ = log8_grid(torch.stack([lo, hi], dim=-1), tensor_dims=2 if w.dim() >= 3 and w.shape[-2] == 1 else 1)
        return lo_hi[..., 0], lo_hi[..., 1]
    best = _grid_of_range(lo, hi, spec)
    if clip is None or clip.max_shrink == 0:
        return best
    weight = None if col_weight is None else col_weight.float()
    best_err = None
    mid = (lo + hi) / 2 if spec.float_zeros else torch.zeros_like(lo)  # exact ranges shrink about their middle
    for factor in clip.factors:  # a loop over ~25 candidates keeps memory at one group's size
        scale, zero = _grid_of_range(mid + (lo - mid) * factor, mid + (hi - mid) * factor, spec)
        deq = dequantize_codes(quantize_codes(w, scale[..., None], zero[..., None], spec), scale[..., None], zero[..., None], spec)
        sq = (deq - w).square_()  # [..., rows, k]
        err = (sq if weight is None else sq * weight).sum(dim=-1)  # [..., rows]
        if best_err is None:
            best_err, best = err, (scale, zero)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]))
    return best


def log8_grid(lo_hi: Tensor, tensor_dims: int = 1) -> tuple[Tensor, Tensor]:
    """Round lo/hi [..., *tensor, 2] (lo <= 0 <= hi) to their tensor's 8-bit log grid: (rounded lo_hi, magnitude range
    [..., 2]). The last `tensor_dims` dims before the (lo, hi) axis form one tensor; leading dims are a batch.

    Per tensor, magnitudes m > 0 become codes 1..255 on a geometric grid from the smallest to the largest magnitude
    (log8_levels), to the nearest level in log terms (relative error <= half a step); 0 stays 0. Both extremes are
    levels, so rounding the result again (or make_quantized finding the grid from it) gives the same grid.
    """
    mags = torch.stack([-lo_hi[..., 0], lo_hi[..., 1]], dim=-1).float().cpu()  # [..., *tensor, 2] magnitudes >= 0
    batch_shape = mags.shape[: mags.dim() - tensor_dims - 1]  # (a few values per row: CPU, next to the Python table)
    flat = mags.reshape(math.prod(batch_shape), -1)  # [tensors, n]
    rounded, ranges = torch.empty_like(flat), torch.zeros(flat.shape[0], 2)
    for t, m in enumerate(flat):
        nonzero = m > 0
        if not bool(nonzero.any()):
            rounded[t] = 0.0
            continue
        smallest, largest = float(m[nonzero].min()), float(m.max())
        step = (math.log(largest) - math.log(smallest)) / LOG8_STEPS
        offset = (m.double().clamp(min=smallest).log() - math.log(smallest)) / step if step > 0 else torch.zeros_like(m.double())
        codes = torch.where(nonzero, offset.round().clamp(0, LOG8_STEPS) + 1, 0).to(torch.uint8)  # [n]
        ranges[t] = torch.tensor([smallest, largest])
        rounded[t] = log8_levels(smallest, largest)[codes.long()]  # the decoder's table (log8_lo_hi)
    signs = torch.tensor([-1.0, 1.0], device=lo_hi.device)
    out = (rounded.reshape(mags.shape).to(lo_hi.device) * signs).add_(0.0)  # + 0.0: a zero lo is +0, not -0
    return out, ranges.reshape(*batch_shape, 2).to(lo_hi.device)


def _tensor_range(lo_hi: Tensor) -> Tensor:
    """(smallest, largest) nonzero magnitude [2] of a tensor's lo_hi [rows, 2]; zeros when they are all 0."""
    mags = lo_hi.abs().flatten()
    if not bool((mags > 0).any()):
        return torch.zeros(2, device=lo_hi.device)
    return torch.stack([mags[mags > 0].min(), mags.max()]).float()


def _grid_of_range(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """(scale, zero) of the intN grid covering [lo, hi] (lo <= 0 <= hi unless float_zeros), rounded to their stored
    precision."""
    if spec.float_zeros:
        return _float_grid_of_range(lo, hi, spec)
    if spec.symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)  # an all-zero group still needs a finite scale
    lo = torch.where(empty, -1.0, lo)
    hi = torch.where(empty, 1.0, hi)
    scale = ((hi - lo) / spec.maxq).clamp(min=_SMALLEST_SCALE).to(SCALE_DTYPE).float()
    if spec.symmetric:
        zero = torch.full_like(scale, float(2 ** (spec.bits - 1)))
    else:
        zero = torch.round(-lo / scale).clamp(0, spec.maxq)
    return scale, zero


def _float_grid_of_range(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """(scale, fp16 zero) of the grid spanning exactly [lo, hi]. Where that is impossible (a constant group, or a
    zero point beyond fp16's range because the group's spread is tiny next to its offset) the range is widened to
    contain 0, as for integer zero points."""
    scale = ((hi - lo) / spec.maxq).clamp(min=_SMALLEST_SCALE).to(SCALE_DTYPE).float()
    zero = (-lo / scale).to(SCALE_DTYPE).float()
    bad = (hi <= lo) | ~torch.isfinite(zero) | ~torch.isfinite(scale)
    if bad.any():
        integer = replace(spec, float_zeros=False)
        scale0, zero0 = _grid_of_range(lo.clamp(max=0.0), hi.clamp(min=0.0), integer)
        scale, zero = torch.where(bad, scale0, scale), torch.where(bad, zero0, zero)
    return scale, zero


def quantize_codes(w: Tensor, p0: Tensor, p1: Tensor, spec: QuantSpec) -> Tensor:
    """Codes (uint8, shape of `w`) of `w` on the grid (p0, p1) from find_params, broadcast against `w`."""
    w = w.float()
    if spec.is_ternary:  # p0 = lo, p1 = hi
        return torch.where(w > p1 / 2, 2, torch.where(w < p0 / 2, 1, 0)).to(torch.uint8)
    if spec.float_zeros:  # the nearest level of (code - zero) * scale
        return torch.round(w / p0 + p1).clamp(0, spec.maxq).to(torch.uint8)
    return (torch.round(w / p0) + p1).clamp(0, spec.maxq).to(torch.uint8)


def dequantize_codes(codes: Tensor, p0: Tensor, p1: Tensor, spec: QuantSpec) -> Tensor:
    """fp32 values of `codes` on the grid (p0, p1); the runtime QuantLinear computes exactly the same numbers."""
    if spec.is_ternary:
        zero = torch.zeros((), dtype=torch.float32, device=codes.device)
        return torch.where(codes == 2, p1, torch.where(codes == 1, p0, zero))
    return (codes.float() - p1) * p0


def quantize_rtn(w: Tensor, spec: QuantSpec, clip: ClipSearch | None = None) -> QuantizedTensor:
    """Round-to-nearest quantization of `w` [out, in] on the grid of `spec` (the baseline GPTQ must beat);
    `clip` searches each group's range for the smallest rounding error."""
    if w.dim() != 2:
        raise RecipeError(f"expected a 2-D weight matrix, got shape {tuple(w.shape)}; quantize one linear at a time")
    out_features, in_features = w.shape
    width = spec.group_width(in_features)
    groups = w.float().reshape(out_features, in_features // width, width)  # [out, n_groups, G]
    p0, p1 = find_params(groups, spec, clip)  # [out, n_groups]
    codes = quantize_codes(groups, p0[..., None], p1[..., None], spec).reshape(out_features, in_features)
    return make_quantized(codes, p0, p1, spec)


def make_quantized(codes: Tensor, p0: Tensor, p1: Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Wrap codes [out, in] and per-group parameters [out, n_groups] from find_params in a QuantizedTensor."""
    if spec.is_ternary:  # lo/hi from find_params lie on their tensor's log8 grid, whose extremes they contain
        lo_hi = torch.stack([p0[:, 0], p1[:, 0]], dim=1)  # [out, 2]
        return QuantizedTensor(spec, codes, scales=_tensor_range(lo_hi).expand(lo_hi.shape[0], 2).clone(), lo_hi=lo_hi)
    return QuantizedTensor(spec, codes, scales=p0, zeros=None if spec.symmetric else p1)


def group_params(q: QuantizedTensor) -> tuple[Tensor, Tensor]:
    """(p0, p1) of `q`, each [out, n_groups] (n_groups = 1 for ternary), as find_params returns them."""
    if q.spec.is_ternary:
        assert q.lo_hi is not None
        return q.lo_hi[:, :1], q.lo_hi[:, 1:]
    assert q.scales is not None
    zeros = q.zeros if q.zeros is not None else torch.full_like(q.scales, float(2 ** (q.spec.bits - 1)))
    return q.scales, zeros


def dequantize(q: QuantizedTensor) -> Tensor:
    """fp32 [out, in] weight represented by `q`."""
    out_features, in_features = q.shape
    p0, p1 = group_params(q)
    n_groups = p0.shape[1]
    codes = q.codes.reshape(out_features, n_groups, in_features // n_groups)  # [out, n_groups, G]
    return dequantize_codes(codes, p0[..., None], p1[..., None], q.spec).reshape(out_features, in_features)
