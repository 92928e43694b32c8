"""Refit: re-solve each layer's down projection by least squares under the routing it will run with.

Once the partition and router are fixed, the MoE layer's output is linear in the down-projection
weights: y = (h ⊙ g) Wᵀ, where h [T, d_ff] are the neuron activations and g [T, d_ff] the routing
weight of each neuron's expert (0 when the expert is not selected, 1 for shared neurons). So the
W that best reproduces the dense FFN output on calibration tokens is a ridge regression, solved in
closed form: the dropped neurons' contribution is partly absorbed by the active ones that correlate
with them (the same idea as output compensation in pruning, e.g. FLAP's bias compensation and
SparseGPT's reconstruction, here applied per routed token set).
The ridge pulls W towards the dense weights, not towards zero. The last calibration windows are
held out: they pick the ridge strength from a few candidates and decide whether the refit is kept
at all (a refit that does not lower their error is discarded), so a small calibration budget that
would overfit leaves the layer as it was.

The solve at scale (d_ff = N up to 14336, T training tokens, T_h held out, d outputs, D ridge strengths):
- T < N (e.g. 4K calibration tokens at 8B): the rows themselves are kept ([T, N], no bigger than the
  N x N Gram matrix) and the ridge is solved in its dual form, W = W0 + Xᵀ(XXᵀ + λI)⁻¹(Y - X W0ᵀ):
  a T x T Cholesky per ridge strength instead of an N x N one (and no Gram accumulation at all);
- T ≥ N: XᵀX and XᵀY are accumulated and factored (N x N Cholesky per ridge strength).
Either way a candidate is judged on the held-out rows through the factor against their T_h columns
(cost ~T_h, not d, right-hand sides); only the winner is factored again and solved for all d outputs. One eigendecomposition
serving every ridge strength was measured slower: eigh costs 20-30 Cholesky factorizations at these sizes
on CPU (benchmarks/refit_scale.py), more than the 5 default candidates.
Arithmetic is float32 where the ridge keeps the system well conditioned: κ ≤ (λ_max + λ)/λ, λ_max by power
iteration; above KAPPA_FLOAT32 (or with precision="float64") the factorization runs in float64.
Everything runs on the device the activations are on (CUDA when converting on a GPU).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import Tensor

from moeconv.config import RefitConfig
from moeconv.errors import RecipeError
from moeconv.ffn import DenseFFN

log = logging.getLogger(__name__)
# A float32 Cholesky solve loses ~κ·2⁻²⁴ relative accuracy: at κ ≤ 1.6e4 that is ≤ 1e-3 of the fitted correction.
KAPPA_FLOAT32 = 1.6e4


def neuron_gates(ids: Tensor, weights: Tensor, expert_size: int, num_experts: int, shared_size: int) -> Tensor:
    """Per-token multiplier of every neuron in block order (shared first, then expert 0, 1, ...).

    ids, weights [T, k] -> [T, shared_size + E·expert_size]
    """
    per_expert = torch.zeros(ids.shape[0], num_experts, dtype=weights.dtype, device=weights.device)
    per_expert.scatter_add_(1, ids, weights)  # [T, E]
    routed = per_expert.repeat_interleave(expert_size, dim=1)  # [T, E·s]
    shared = torch.ones(ids.shape[0], shared_size, dtype=weights.dtype, device=weights.device)
    return torch.cat([shared, routed], dim=1)


def _largest_eigenvalue(m: Tensor, iterations: int = 20) -> float:
    """λ_max of a symmetric PSD matrix by power iteration (deterministic start; an estimate from below)."""
    v = torch.randn(m.shape[0], 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(m)
    top = 0.0
    for _ in range(iterations):
        w = m @ v
        top = float(w.norm())
        if top == 0.0:
            return 0.0
        v = w / top
    return float((v.T @ (m @ v)).squeeze())


class NormalEquations:
    """A least-squares problem Y ≈ X Wᵀ fed in token chunks: the rows kept as they are while there are fewer
    than inputs (`rows` is the expected count), else running XᵀX and XᵀY.  dtype float32 or float64."""

    def __init__(self, inputs: int, outputs: int, rows: int | None = None, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu", precision: str = "auto"):
        self.inputs, self.outputs, self.dtype, self.device, self.precision = inputs, outputs, dtype, torch.device(device), precision
        self.dual = rows is not None and rows < inputs
        self.x: list[Tensor] = []
        self.y: list[Tensor] = []
        if not self.dual:
            self.gram = torch.zeros(inputs, inputs, dtype=dtype, device=self.device)
            self.cross = torch.zeros(inputs, outputs, dtype=dtype, device=self.device)

    def add(self, x: Tensor, y: Tensor) -> None:
        """x [t, N] (masked activations), y [t, d] (targets)."""
        x, y = x.to(self.device, self.dtype), y.to(self.device, self.dtype)
        if self.dual:
            self.x.append(x)
            self.y.append(y)
        else:
            self.gram += x.T @ x
            self.cross += x.T @ y

    def solver(self, w0: Tensor, held_x: Tensor | None) -> _Ridge:
        """The ridge problem towards w0 [d, N], with held-out rows held_x [T_h, N] to judge candidates."""
        w0t = w0.T.to(self.device, self.dtype)
        held_x = None if held_x is None else held_x.to(self.device, self.dtype)
        if self.dual:
            x = torch.cat(self.x) if self.x else torch.zeros(0, self.inputs, dtype=self.dtype, device=self.device)
            y = torch.cat(self.y) if self.y else torch.zeros(0, self.outputs, dtype=self.dtype, device=self.device)
            self.x, self.y = [x], [y]  # the chunks are not held twice
            return _Dual(x, y, w0t, held_x, self.precision)
        return _Primal(self.gram, self.cross, w0t, held_x, self.precision)

    def solve(self, w0: Tensor, damp: float) -> Tensor:
        """argmin ||Y - X Wᵀ||² + λ||W - W0||², λ = damp · mean diag(XᵀX).  w0 [d, N] -> [d, N]"""
        ridge = self.solver(w0, None)
        lam = damp * ridge.scale
        return ridge.weights(ridge.factor(lam), lam).T.to(w0.device, w0.dtype)


def normal_equations(inputs: int, outputs: int, rows: int, config: RefitConfig, device: torch.device | str) -> NormalEquations:
    """The accumulator a refit of `rows` training tokens uses under `config` (float32 unless precision is float64)."""
    dtype = torch.float64 if config.precision == "float64" else torch.float32
    return NormalEquations(inputs, outputs, rows=rows, dtype=dtype, device=device, precision=config.precision)


class _Ridge:
    """One ridge problem: `matrix` (N x N Gram or T x T kernel) shifted by λ and factored per candidate."""

    matrix: Tensor
    scale: float  # mean diag(XᵀX): λ = damp · scale
    precision: str

    def factor(self, lam: float) -> Tensor:
        """Cholesky factor of matrix + λI, float64 where float32 would lose too much (see KAPPA_FLOAT32)."""
        wide = self.precision == "float64" or self.matrix.dtype == torch.float64
        if not wide and self.precision == "auto":
            if not hasattr(self, "_top"):
                self._top = _largest_eigenvalue(self.matrix)
            wide = (self._top + lam) / lam > KAPPA_FLOAT32
            if wide:
                log.debug("refit candidate λ=%.3g: condition bound %.3g > %.3g, factored in float64", lam, (self._top + lam) / lam, KAPPA_FLOAT32)
        m = self.wide_matrix() if wide else self.matrix
        diagonal = m.diagonal().clone()
        try:  # shifted in place and put back: no N x N copy besides the factor
            m.diagonal().add_(lam)
            return torch.linalg.cholesky(m)
        finally:
            m.diagonal().copy_(diagonal)

    def wide_matrix(self) -> Tensor:
        return self.matrix.double()


class _Primal(_Ridge):
    """W = (G + λI)⁻¹(C + λW0ᵀ) from G = XᵀX [N, N], C = XᵀY [N, d]."""

    def __init__(self, gram: Tensor, cross: Tensor, w0t: Tensor, held_x: Tensor | None, precision: str):
        self.matrix, self.cross, self.w0t, self.held_x, self.precision = gram, cross, w0t, held_x, precision
        self.scale = float(gram.diagonal().mean().clamp_min(1e-30))

    def held(self, factor: Tensor, lam: float) -> Tensor:
        """Held-out predictions X_h Wᵀ(λ) = (A⁻¹X_hᵀ)ᵀ(C + λW0ᵀ): T_h right-hand sides, not d.  [T_h, d]"""
        v = torch.cholesky_solve(self.held_x.T.to(factor.dtype), factor)  # [N, T_h]
        return v.T @ self.cross.to(factor.dtype) + lam * (v.T @ self.w0t.to(factor.dtype))

    def weights(self, factor: Tensor, lam: float) -> Tensor:
        """Wᵀ [N, d]"""
        rhs = self.cross.to(factor.dtype, copy=True)
        rhs.add_(self.w0t.to(factor.dtype), alpha=lam)  # in place: one [N, d] temporary fewer
        return torch.cholesky_solve(rhs, factor)


class _Dual(_Ridge):
    """W = W0 + Xᵀ(K + λI)⁻¹R, K = XXᵀ [T, T], R = Y - XW0ᵀ: the same ridge solution in T x T."""

    def __init__(self, x: Tensor, y: Tensor, w0t: Tensor, held_x: Tensor | None, precision: str):
        self.x, self.w0t, self.precision = x, w0t, precision
        self.residual = y - x @ w0t  # [T, d]
        self.matrix = x @ x.T
        self.scale = max(float(self.matrix.diagonal().sum()) / x.shape[1], 1e-30)  # mean diag(XᵀX) = trace(K) / N
        if held_x is not None:
            self.held_base, self.held_cross = held_x @ w0t, held_x @ x.T  # [T_h, d], [T_h, T]

    def wide_matrix(self) -> Tensor:
        if not hasattr(self, "_wide"):  # from the rows: the float32 product would carry its rounding into float64
            wide = self.x.double()
            self._wide = wide @ wide.T  # T x T: kept for the next widened candidate
        return self._wide

    def held(self, factor: Tensor, lam: float) -> Tensor:
        v = torch.cholesky_solve(self.held_cross.T.to(factor.dtype), factor)  # [T, T_h]
        return self.held_base.to(factor.dtype) + v.T @ self.residual.to(factor.dtype)

    def weights(self, factor: Tensor, lam: float) -> Tensor:
        alpha = torch.cholesky_solve(self.residual.to(factor.dtype), factor)  # [T, d]
        return self.w0t + (self.x.T @ alpha.to(self.x.dtype))


class HeldOut:
    """Held-out rows kept as they are (float32): their error for a candidate W costs T_held·N·d, not N²·d."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.x: list[Tensor] = []
        self.y: list[Tensor] = []

    def add(self, x: Tensor, y: Tensor) -> None:
        self.x.append(x.float().to(self.device))
        self.y.append(y.float().to(self.device))

    def rows(self) -> tuple[Tensor, Tensor]:
        return torch.cat(self.x), torch.cat(self.y)  # [T_held, N], [T_held, d]

    def relative_error(self, w: Tensor) -> float:
        x, y = self.rows()
        return float((y - x @ w.float().to(x.device).T).norm() / y.norm().clamp_min(1e-30))


def _relative(y: Tensor, pred: Tensor) -> float:
    y64 = y.double()
    return float((y64 - pred.double()).norm() / y64.norm().clamp_min(1e-30))


def refit_with_holdout(train: NormalEquations, held: HeldOut, w0: Tensor, damps: list[float]
                       ) -> tuple[Tensor, dict[str, float]]:
    """The refit (fitted on `train`) with the damp that gives the lowest error on `held`, or w0 when none
    lowers it by more than rounding noise, and its metrics. Each candidate is one Cholesky factorization judged
    on the held-out rows; only the winner is solved for every output."""
    held_x, held_y = held.rows()
    before = _relative(held_y, held_x @ w0.float().to(held_x.device).T)
    ridge = train.solver(w0, held_x)
    best, best_error, best_damp = None, before, 0.0
    for damp in damps:
        lam = damp * ridge.scale
        try:
            factor = ridge.factor(lam)
        except torch.linalg.LinAlgError:  # numerically singular at this damp (e.g. dead neurons): try the next
            continue
        error = _relative(held_y, ridge.held(factor, lam))
        del factor
        if error < best_error * (1 - 1e-6):
            best, best_error, best_damp = lam, error, damp
    # The winner is factored again rather than kept: one more factorization instead of a second N x N matrix in memory.
    fitted = w0 if best is None else ridge.weights(ridge.factor(best), best).T.to(w0.device, w0.dtype)
    # refit_error_after is the error of the weights actually used: a discarded refit leaves it unchanged.
    metrics = {"refit_error_before": before, "refit_error_after": best_error, "refit_kept": float(best is not None),
               "refit_damp": best_damp}
    return fitted, metrics


@torch.no_grad()
def refit_down(ffn: DenseFFN, order: Tensor, gates_fn, x: Tensor, config: RefitConfig,
               device: torch.device | str | None = None, offset: Tensor | None = None) -> tuple[DenseFFN, dict[str, float]]:
    """The FFN with its down projection refitted, and held-out metrics.

    order [d_ff]: dense neuron ids in block order; gates_fn(x [T, d]) -> [T, d_ff] the routing weight
    of each neuron (block order) for those tokens, on x's device. x [T, d]: the layer's captured FFN inputs,
    window by window. device: where the refit computes (default: x's); the returned FFN stays where ffn was.
    offset [T, d]: added to the target (the dense FFN's output on x), e.g. the gap to the dense layer's output.
    """
    device = torch.device(device) if device is not None else x.device
    total = x.shape[0]
    held = max(1, int(round(total * config.holdout_fraction)))
    if held >= total:
        raise RecipeError(f"refit needs at least 2 calibration tokens, got {total}; capture more tokens")
    # The last tokens judge the fit: calibration rows come window by window, so these are the last windows
    # (the first of them possibly in part). Tokens drawn at random would share windows (and so context)
    # with the fitted ones, and approve a refit that overfits a small budget.
    split = total - held
    sub = ffn.to(torch.float32).select(order).to(device)  # neurons in block order, no output bias
    w0 = sub.down  # [d, N]
    stats = {"train": normal_equations(*w0.shape[::-1], split, config, device), "held": HeldOut(device)}
    for part, rows in (("train", torch.arange(split)), ("held", torch.arange(split, total))):
        for chunk in rows.split(config.chunk):
            xc = x[chunk].to(device, torch.float32)
            h = sub.intermediate(xc)  # [t, N]
            target = h @ w0.T if offset is None else h @ w0.T + offset[chunk].to(device, torch.float32)
            stats[part].add(h * gates_fn(xc), target)  # the dense FFN output (without its bias) [+ offset]
    fitted, metrics = refit_with_holdout(stats["train"], stats["held"], w0, config.damp)
    if not metrics["refit_kept"]:
        return ffn, metrics
    down = ffn.down.clone()
    down[:, order.to(down.device)] = fitted.to(down.device, down.dtype)
    return replace(ffn, down=down), metrics
