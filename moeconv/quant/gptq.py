"""GPTQ (Frantar et al. 2022) on any grid of grids.py, batched over same-shape problems, with an RTN fallback."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from moeconv.errors import RecipeError
from moeconv.quant.grids import (
    QuantizedTensor,
    QuantSpec,
    dequantize,
    dequantize_codes,
    find_params,
    make_quantized,
    quantize_codes,
    quantize_rtn,
)

logger = logging.getLogger(__name__)


class HessianAccumulator:
    """Accumulates H = 2 XᵀX / n in fp32 over calibration batches of a linear layer's inputs."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)  # [in, in]
        self.num_samples = 0

    def add_batch(self, x: Tensor) -> None:
        """x: [..., in] inputs (any leading shape; each row is one sample)."""
        x = x.reshape(-1, self.in_features).to(device=self.xtx.device, dtype=torch.float32)  # [T, in]
        self.xtx.addmm_(x.T, x)
        self.num_samples += x.shape[0]

    def finalize(self) -> Tensor:
        """H [in, in]; all zeros if no sample was seen (GPTQ then reduces to round-to-nearest)."""
        return self.xtx * (2.0 / max(self.num_samples, 1))


@dataclass
class GPTQResult:
    """q: the quantized matrix; fell_back: GPTQ was impossible and `q` is round-to-nearest (message says why);
    error: relative output error ‖(W−Q)X‖/‖WX‖ under the (undamped) Hessian given."""

    q: QuantizedTensor
    fell_back: bool
    message: str
    error: float


def relative_output_error(w: Tensor, wq: Tensor, H: Tensor) -> Tensor:
    """sqrt(tr(ΔHΔᵀ) / tr(WHWᵀ)) = ‖(W−Q)X‖_F / ‖WX‖_F for H ∝ XᵀX; batched over leading dims -> [...]."""
    delta = w.float() - wq.float()  # [..., out, in]
    num = ((delta @ H.float()) * delta).sum(dim=(-2, -1))
    den = ((w.float() @ H.float()) * w.float()).sum(dim=(-2, -1))
    return (num / den).clamp(min=0).sqrt()


def gptq_quantize(
    w: Tensor,
    H: Tensor,
    spec: QuantSpec,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    name: str = "weight",
) -> GPTQResult:
    """GPTQ of one matrix w [out, in] with Hessian H [in, in]."""
    return gptq_quantize_batched(w[None], H[None], spec, block_size, damp, act_order, [name])[0]


def gptq_quantize_batched(
    w: Tensor,
    H: Tensor,
    spec: QuantSpec,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    names: list[str] | None = None,
) -> list[GPTQResult]:
    """GPTQ of B same-shape problems at once: w [B, out, in], H [B, in, in] (e.g. the experts of one layer).

    Group parameters are computed when a group starts, from the error-updated weights, except with
    act_order, where groups would straddle the permuted order: then all groups' parameters are computed
    up front from W ("static groups"), so the stored format needs no column->group index. Per-row grids
    (group_size -1, ternary) always take their parameters from W up front.
    Dead inputs (diag H = 0) keep their weights and are rounded to nearest (the reference zeroes them).
    """
    if w.dim() != 3 or H.dim() != 3 or H.shape != (w.shape[0], w.shape[2], w.shape[2]):
        raise ValueError(f"expected w [B, out, in] and H [B, in, in], got {tuple(w.shape)} and {tuple(H.shape)}")
    if damp < 0 or block_size < 1:
        raise RecipeError(f"GPTQ damp {damp} / block size {block_size} invalid; use damp >= 0 and block size >= 1")
    batch, rows, cols = w.shape
    width = spec.group_width(cols)
    names = names or [f"weight[{b}]" for b in range(batch)]
    device = w.device
    W = w.detach().float().clone()  # [B, out, in]
    Hd = H.detach().float().clone()  # [B, in, in]
    diag = torch.diagonal(Hd, dim1=-2, dim2=-1)  # view [B, in]
    diag.masked_fill_(diag == 0, 1.0)

    static = width == cols or act_order
    n_groups = cols // width
    p0 = torch.zeros(batch, rows, n_groups, device=device)  # scale / lo per group
    p1 = torch.zeros(batch, rows, n_groups, device=device)  # zero / hi
    if static:
        p0, p1 = find_params(W.reshape(batch, rows, n_groups, width), spec)  # [B, out, n_groups]
    order = torch.arange(cols, device=device).expand(batch, cols)  # [B, in] original column of each step
    if act_order:
        order = torch.argsort(diag, dim=1, descending=True, stable=True)
        W = W.gather(2, order[:, None, :].expand(batch, rows, cols))
        Hd = Hd.gather(1, order[:, :, None].expand(batch, cols, cols)).gather(2, order[:, None, :].expand(batch, cols, cols))
        diag = torch.diagonal(Hd, dim1=-2, dim2=-1)
    col_group = order // width  # [B, in] group of each step's column

    Hd += (damp * diag.mean(dim=1))[:, None, None] * torch.eye(cols, device=device)
    upper, failed = _upper_cholesky_of_inverse(Hd)

    block = block_size if static else max(width, block_size // width * width)  # groups never straddle blocks
    codes = torch.zeros(batch, rows, cols, dtype=torch.uint8, device=device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, :, i1:i2].clone()  # [B, out, bs] updated in place column by column
        err1 = torch.zeros_like(W1)
        inv1 = upper[:, i1:i2, i1:i2]  # [B, bs, bs]
        index = col_group[:, None, i1:i2].expand(batch, rows, i2 - i1)
        P0, P1 = p0.gather(2, index), p1.gather(2, index)  # [B, out, bs] grid of each column
        for i in range(i2 - i1):
            if not static and (i1 + i) % width == 0:  # a group starts: fit it to the updated weights
                g = (i1 + i) // width
                p0[:, :, g], p1[:, :, g] = find_params(W1[:, :, i : i + width], spec)
                P0[:, :, i : i + width] = p0[:, :, g : g + 1]
                P1[:, :, i : i + width] = p1[:, :, g : g + 1]
            col = W1[:, :, i]  # [B, out]
            c = quantize_codes(col, P0[:, :, i], P1[:, :, i], spec)
            codes[:, :, i1 + i] = c
            err = (col - dequantize_codes(c, P0[:, :, i], P1[:, :, i], spec)) / inv1[:, i, i][:, None]  # [B, out]
            W1[:, :, i + 1 :] -= err[:, :, None] * inv1[:, None, i, i + 1 :]  # [B, out, bs-i-1]
            err1[:, :, i] = err
        W[:, :, i2:] -= torch.bmm(err1, upper[:, i1:i2, i2:])  # lazy batch update of the later blocks

    if act_order:  # back to the original column order
        codes = torch.empty_like(codes).scatter_(2, order[:, None, :].expand(batch, rows, cols), codes)
    results = []
    for b in range(batch):
        if failed[b]:
            message = f"{names[b]}: Cholesky of the damped Hessian failed; used round-to-nearest (try a larger damp)"
            logger.debug(message)
            results.append(_result(quantize_rtn(w[b], spec), w[b], H[b], True, message))
        else:
            results.append(_result(make_quantized(codes[b], p0[b], p1[b], spec), w[b], H[b], False, ""))
    return results


def _upper_cholesky_of_inverse(Hd: Tensor) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor of H⁻¹ per problem [B, in, in], and which problems failed [B] (identity there)."""
    eye = torch.eye(Hd.shape[-1], device=Hd.device).expand_as(Hd)
    failed = ~torch.isfinite(Hd).all(dim=(1, 2))
    lower, info = torch.linalg.cholesky_ex(torch.where(failed[:, None, None], eye, Hd))
    failed |= info != 0
    inverse = torch.cholesky_inverse(torch.where(failed[:, None, None], eye, lower))
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    failed |= (info != 0) | ~torch.isfinite(upper).all(dim=(1, 2))
    return torch.where(failed[:, None, None], eye, upper), failed


def _result(q: QuantizedTensor, w: Tensor, H: Tensor, fell_back: bool, message: str) -> GPTQResult:
    return GPTQResult(q, fell_back, message, float(relative_output_error(w, dequantize(q), H)))
