"""GPTQ (Frantar et al. 2022) on any grid of grids.py, batched over same-shape problems, with an RTN fallback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from moeconv.config import ClipSearch, QuantSpec
from moeconv.errors import RecipeError
from moeconv.quant.grids import (
    QuantizedTensor,
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
    error: relative output error ‖(W−Q)X‖/‖WX‖ under the (undamped) Hessian given; row_terms [out, 2]: each row's
    (‖(W−Q)ᵢX‖², ‖WᵢX‖²) up to the common factor, so the error of any subset of rows is sqrt(Σ num / Σ den)."""

    q: QuantizedTensor
    fell_back: bool
    message: str
    error: float
    row_terms: Tensor


def output_error_terms(w: Tensor, wq: Tensor, H: Tensor) -> Tensor:
    """Per row: (ΔᵢHΔᵢᵀ, WᵢHWᵢᵀ) for Δ = W − Q; w, wq [..., out, in], H [..., in, in] -> [..., out, 2]."""
    w = w.float()
    both = torch.cat([w - wq.float(), w], dim=-2)  # [..., 2·out, in] one matmul for both terms
    terms = ((both @ H.float()) * both).sum(dim=-1)  # [..., 2·out]
    return torch.stack(terms.chunk(2, dim=-1), dim=-1)


def relative_error_of(terms: Tensor) -> Tensor:
    """sqrt(Σ num / Σ den) over the rows of terms [..., out, 2] -> [...]."""
    total = terms.sum(dim=-2)  # [..., 2]
    return (total[..., 0] / total[..., 1]).clamp(min=0).sqrt()


def relative_output_error(w: Tensor, wq: Tensor, H: Tensor) -> Tensor:
    """sqrt(tr(ΔHΔᵀ) / tr(WHWᵀ)) = ‖(W−Q)X‖_F / ‖WX‖_F for H ∝ XᵀX; batched over leading dims -> [...]."""
    return relative_error_of(output_error_terms(w, wq, H))


def gptq_quantize(
    w: Tensor,
    H: Tensor,
    spec: QuantSpec,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    name: str = "weight",
    clip: ClipSearch | None = None,
) -> GPTQResult:
    """GPTQ of one matrix w [out, in] with Hessian H [in, in]."""
    return gptq_quantize_batched(w[None], H[None], spec, block_size, damp, act_order, [name], clip)[0]


def gptq_quantize_batched(
    w: Tensor,
    H: Tensor,
    spec: QuantSpec,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    names: list[str] | None = None,
    clip: ClipSearch | None = None,
) -> list[GPTQResult]:
    """GPTQ of B same-shape problems at once: w [B, out, in], H [B, in, in] (e.g. the experts of one layer).

    Group parameters are computed when a group starts, from the error-updated weights, except with
    act_order, where groups would straddle the permuted order: then all groups' parameters are computed
    up front from W ("static groups"), so the stored format needs no column->group index. Per-row grids
    (group_size -1, ternary) always take their parameters from W up front. `clip` searches each group's
    range (intN), weighting each column's rounding error by diag(H).
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
    col_weight = diag.clone()  # [B, in] importance of each input for the clip search (original order)

    static = width == cols or act_order
    n_groups = cols // width
    p0 = torch.zeros(batch, rows, n_groups, device=device)  # scale / lo per group
    p1 = torch.zeros(batch, rows, n_groups, device=device)  # zero / hi
    if static:
        with _one_cpu_thread(device):  # elementwise work on a loaded 2-core machine: one thread is fastest
            p0, p1 = find_params(W.reshape(batch, rows, n_groups, width), spec, clip,
                                 col_weight.reshape(batch, 1, n_groups, width))  # [B, out, n_groups]
    order = torch.arange(cols, device=device).expand(batch, cols)  # [B, in] original column of each step
    if act_order:
        order = torch.argsort(diag, dim=1, descending=True, stable=True)
        W = W.gather(2, order[:, None, :].expand(batch, rows, cols))
        Hd = Hd.gather(1, order[:, :, None].expand(batch, cols, cols)).gather(2, order[:, None, :].expand(batch, cols, cols))
        diag = torch.diagonal(Hd, dim1=-2, dim2=-1)
    col_group = order // width  # [B, in] group of each step's column

    Hd += (damp * diag.mean(dim=1))[:, None, None] * torch.eye(cols, device=device)
    upper, failed = _upper_cholesky_of_inverse(Hd)
    del Hd

    block = block_size if static else max(width, block_size // width * width)  # groups never straddle blocks
    codes = torch.zeros(batch, rows, cols, dtype=torch.uint8, device=device)
    with _one_cpu_thread(device):
        _sweep(W, upper, codes, p0, p1, col_group, col_weight, spec, width, block, static, clip)

    if act_order:  # back to the original column order
        codes = torch.empty_like(codes).scatter_(2, order[:, None, :].expand(batch, rows, cols), codes)
    qs, messages = [], []
    for b in range(batch):
        if failed[b]:
            message = f"{names[b]}: Cholesky of the damped Hessian failed; used round-to-nearest (try a larger damp)"
            logger.debug(message)
            qs.append(quantize_rtn(w[b], spec, clip))
            messages.append(message)
        else:
            qs.append(make_quantized(codes[b], p0[b], p1[b], spec))
            messages.append("")
    terms = output_error_terms(w, torch.stack([dequantize(q) for q in qs]), H)  # [B, out, 2] one batched pass
    errors = relative_error_of(terms).tolist()
    return [GPTQResult(q, bool(failed[b]), messages[b], errors[b], terms[b]) for b, q in enumerate(qs)]


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """The column loop runs thousands of small ops: on CPU, intra-op threads only add synchronisation
    (a 576x1536 matrix: 0.4 s with one thread, 4 s with two on the loaded 2-core machine)."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sweep(W: Tensor, upper: Tensor, codes: Tensor, p0: Tensor, p1: Tensor, col_group: Tensor, col_weight: Tensor,
           spec: QuantSpec, width: int, block: int, static: bool, clip: ClipSearch | None) -> None:
    """The blocked GPTQ sweep over the columns: fills `codes` [B, out, in] and, unless static, the group parameters
    p0/p1 [B, out, n_groups] in place; W [B, out, in] is consumed (error updates)."""
    batch, rows, cols = W.shape
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, :, i1:i2].clone()  # [B, out, bs] updated in place column by column
        Q1 = torch.empty_like(W1)  # codes as floats
        E1 = torch.empty_like(W1)  # scaled errors, for the lazy update of later blocks
        U1 = upper[:, i1:i2, i1:i2]  # [B, bs, bs]
        inv_diag = 1.0 / torch.diagonal(U1, dim1=-2, dim2=-1)[:, None, :]  # [B, 1, bs]
        index = col_group[:, None, i1:i2].expand(batch, rows, i2 - i1)
        P0, P1 = p0.gather(2, index), p1.gather(2, index)  # [B, out, bs] grid of each column
        for i in range(i2 - i1):
            if not static and (i1 + i) % width == 0:  # a group starts: fit it to the updated weights
                g = (i1 + i) // width
                p0[:, :, g], p1[:, :, g] = find_params(W1[:, :, i : i + width], spec, clip, col_weight[:, None, i1 + i : i1 + i + width])
                P0[:, :, i : i + width] = p0[:, :, g : g + 1]
                P1[:, :, i : i + width] = p1[:, :, g : g + 1]
            col = W1[:, :, i]  # [B, out]
            q, deq = _round(col, P0[:, :, i], P1[:, :, i], spec)
            Q1[:, :, i] = q
            err = (col - deq).mul_(inv_diag[:, :, i])  # [B, out]
            E1[:, :, i] = err
            if i + 1 < i2 - i1:
                W1[:, :, i + 1 :].addcmul_(err[:, :, None], U1[:, None, i, i + 1 :], value=-1.0)  # [B, out, bs-i-1]
        codes[:, :, i1:i2] = Q1.to(torch.uint8)
        if i2 < cols:
            W[:, :, i2:].baddbmm_(E1, upper[:, i1:i2, i2:], alpha=-1.0)  # lazy batch update of the later blocks


def _round(col: Tensor, p0: Tensor, p1: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """(codes as floats, their values) of one column on its grid; the same numbers as quantize_codes/dequantize_codes."""
    if spec.is_ternary:
        codes = quantize_codes(col, p0, p1, spec)
        return codes.float(), dequantize_codes(codes, p0, p1, spec)
    if spec.float_zeros:  # fractional zero points: round after adding them, as quantize_codes does
        q = torch.round(col / p0 + p1).clamp_(0, spec.maxq)
    else:
        q = torch.round(col / p0).add_(p1).clamp_(0, spec.maxq)
    return q, (q - p1).mul_(p0)


def _upper_cholesky_of_inverse(Hd: Tensor) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor U of H⁻¹ (UᵀU = H⁻¹) per problem [B, in, in], and which problems failed [B] (identity there).

    With J the reversal permutation and JHJ = LLᵀ, H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J) and J L⁻¹ J is upper triangular:
    one Cholesky and one triangular inverse instead of Cholesky, full inverse and a second Cholesky."""
    eye = torch.eye(Hd.shape[-1], device=Hd.device).expand_as(Hd)
    failed = ~torch.isfinite(Hd).all(dim=(1, 2))
    flipped = torch.where(failed[:, None, None], eye, Hd).flip(-2, -1)
    lower, info = torch.linalg.cholesky_ex(flipped)
    failed |= info != 0
    lower = torch.where(failed[:, None, None], eye, lower)
    upper = torch.linalg.solve_triangular(lower, eye, upper=False).flip(-2, -1)
    failed |= ~torch.isfinite(upper).all(dim=(1, 2))
    return torch.where(failed[:, None, None], eye, upper), failed
