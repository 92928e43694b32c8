"""Refit: re-solve each layer's down projection by least squares under the routing it will run with.

Once the partition and router are fixed, the MoE layer's output is linear in the down-projection
weights: y = (h ⊙ g) Wᵀ, where h [T, d_ff] are the neuron activations and g [T, d_ff] the routing
weight of each neuron's expert (0 when the expert is not selected, 1 for shared neurons). So the
W that best reproduces the dense FFN output on calibration tokens is a ridge regression, solved in
closed form from a d_ff x d_ff Gram matrix: the dropped neurons' contribution is partly absorbed by
the active ones that correlate with them (the same idea as output compensation in pruning, e.g.
FLAP's bias compensation and SparseGPT's reconstruction, here applied per routed token set).
The ridge pulls W towards the dense weights, not towards zero. The last calibration windows are
held out: they pick the ridge strength from a few candidates and decide whether the refit is kept
at all (a refit that does not lower their error is discarded), so a small calibration budget that
would overfit leaves the layer as it was.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from moeconv.config import RefitConfig
from moeconv.errors import RecipeError
from moeconv.ffn import DenseFFN


def neuron_gates(ids: Tensor, weights: Tensor, expert_size: int, num_experts: int, shared_size: int) -> Tensor:
    """Per-token multiplier of every neuron in block order (shared first, then expert 0, 1, ...).

    ids, weights [T, k] -> [T, shared_size + E·expert_size]
    """
    per_expert = torch.zeros(ids.shape[0], num_experts, dtype=weights.dtype, device=weights.device)
    per_expert.scatter_add_(1, ids, weights)  # [T, E]
    routed = per_expert.repeat_interleave(expert_size, dim=1)  # [T, E·s]
    shared = torch.ones(ids.shape[0], shared_size, dtype=weights.dtype, device=weights.device)
    return torch.cat([shared, routed], dim=1)


class NormalEquations:
    """Running XᵀX and XᵀY (float64) of a least-squares problem Y ≈ X Wᵀ, fed in token chunks."""

    def __init__(self, inputs: int, outputs: int):
        self.gram = torch.zeros(inputs, inputs, dtype=torch.float64)
        self.cross = torch.zeros(inputs, outputs, dtype=torch.float64)

    def add(self, x: Tensor, y: Tensor) -> None:
        """x [t, N] (masked activations), y [t, d] (targets)."""
        x, y = x.double().cpu(), y.double().cpu()
        self.gram += x.T @ x
        self.cross += x.T @ y

    def solve(self, w0: Tensor, damp: float) -> Tensor:
        """argmin ||Y - X Wᵀ||² + λ||W - W0||², λ = damp · mean diag(XᵀX).  w0 [d, N] -> [d, N]"""
        lam = damp * float(self.gram.diagonal().mean().clamp_min(1e-30))
        diagonal = self.gram.diagonal().clone()
        try:  # the damped Gram matrix is symmetric positive definite: one Cholesky, no copy besides the factor
            self.gram.diagonal().add_(lam)
            factor = torch.linalg.cholesky(self.gram)
        finally:
            self.gram.diagonal().copy_(diagonal)
        return torch.cholesky_solve(self.cross + lam * w0.T.double(), factor).T.to(w0.dtype)


class HeldOut:
    """Held-out rows kept as they are (float32): their error for a candidate W costs T_held·N·d, not N²·d."""

    def __init__(self):
        self.x: list[Tensor] = []
        self.y: list[Tensor] = []

    def add(self, x: Tensor, y: Tensor) -> None:
        self.x.append(x.float().cpu())
        self.y.append(y.float().cpu())

    def relative_error(self, w: Tensor) -> float:
        x, y = torch.cat(self.x), torch.cat(self.y)  # [T_held, N], [T_held, d]
        return float((y - x @ w.float().T).norm() / y.norm().clamp_min(1e-30))


def refit_with_holdout(train: NormalEquations, held: HeldOut, w0: Tensor, damps: list[float]
                       ) -> tuple[Tensor, dict[str, float]]:
    """The refit (fitted on `train`) with the damp that gives the lowest error on `held`, or w0 when none
    lowers it by more than rounding noise, and its metrics."""
    before = held.relative_error(w0)
    best, best_error, best_damp = w0, before, 0.0
    for damp in damps:
        try:
            fitted = train.solve(w0, damp)
        except torch.linalg.LinAlgError:  # numerically singular at this damp (e.g. dead neurons): try the next
            continue
        error = held.relative_error(fitted)
        if error < best_error * (1 - 1e-6):
            best, best_error, best_damp = fitted, error, damp
    # refit_error_after is the error of the weights actually used: a discarded refit leaves it unchanged.
    metrics = {"refit_error_before": before, "refit_error_after": best_error, "refit_kept": float(best is not w0),
               "refit_damp": best_damp}
    return best, metrics


@torch.no_grad()
def refit_down(ffn: DenseFFN, order: Tensor, gates_fn, x: Tensor, config: RefitConfig) -> tuple[DenseFFN, dict[str, float]]:
    """The FFN with its down projection refitted, and held-out metrics.

    order [d_ff]: dense neuron ids in block order; gates_fn(x [T, d]) -> [T, d_ff] the routing weight
    of each neuron (block order) for those tokens. x [T, d]: the layer's captured FFN inputs, window by window.
    """
    x = x.float()
    total = x.shape[0]
    held = max(1, int(round(total * config.holdout_fraction)))
    if held >= total:
        raise RecipeError(f"refit needs at least 2 calibration tokens, got {total}; capture more tokens")
    # The last tokens judge the fit: calibration rows come window by window, so these are the last windows
    # (the first of them possibly in part). Tokens drawn at random would share windows (and so context)
    # with the fitted ones, and approve a refit that overfits a small budget.
    split = total - held
    sub = ffn.to(torch.float32).select(order)  # neurons in block order, no output bias
    w0 = sub.down  # [d, N]
    stats = {"train": NormalEquations(*w0.shape[::-1]), "held": HeldOut()}
    for part, rows in (("train", torch.arange(split)), ("held", torch.arange(split, total))):
        for chunk in rows.split(config.chunk):
            h = sub.intermediate(x[chunk])  # [t, N]
            stats[part].add(h * gates_fn(x[chunk]), h @ w0.T)  # target: the dense FFN output (without its bias)
    fitted, metrics = refit_with_holdout(stats["train"], stats["held"], w0, config.damp)
    if not metrics["refit_kept"]:
        return ffn, metrics
    down = ffn.down.clone()
    down[:, order] = fitted.to(down.dtype)
    return replace(ffn, down=down), metrics
