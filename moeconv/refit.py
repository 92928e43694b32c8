"""Refit: re-solve each layer's down projection by least squares under the routing it will run with.

Once the partition and router are fixed, the MoE layer's output is linear in the down-projection
weights: y = (h ⊙ g) Wᵀ, where h [T, d_ff] are the neuron activations and g [T, d_ff] the routing
weight of each neuron's expert (0 when the expert is not selected, 1 for shared neurons). So the
W that best reproduces the dense FFN output on calibration tokens is a ridge regression, solved in
closed form from a d_ff x d_ff Gram matrix: the dropped neurons' contribution is partly absorbed by
the active ones that correlate with them (the same idea as output compensation in pruning, e.g.
FLAP's bias compensation and SparseGPT's reconstruction, here applied per routed token set).
The ridge pulls W towards the dense weights, not towards zero, and a held-out slice of the
calibration tokens decides whether the refit is kept: a refit that does not lower the held-out
error is discarded, so this stage can only help on the calibration distribution.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from moeconv.ffn import DenseFFN


class RefitConfig(BaseModel):
    """Least-squares refit of the down projection (recipe block `refit:`)."""

    model_config = ConfigDict(extra="forbid")
    damp: float = Field(0.05, gt=0, description="ridge strength towards the dense weights, as a fraction of the mean Gram diagonal")
    holdout_fraction: float = Field(0.1, gt=0, lt=1, description="calibration tokens kept out of the fit to judge it")
    chunk: int = Field(4096, ge=1, description="tokens per accumulation chunk (bounds memory)")


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
    """Running XᵀX, XᵀY and ||Y||² (float64) of a least-squares problem Y ≈ X Wᵀ, fed in token chunks."""

    def __init__(self, inputs: int, outputs: int):
        self.gram = torch.zeros(inputs, inputs, dtype=torch.float64)
        self.cross = torch.zeros(inputs, outputs, dtype=torch.float64)
        self.energy = 0.0

    def add(self, x: Tensor, y: Tensor) -> None:
        """x [t, N] (masked activations), y [t, d] (targets)."""
        x, y = x.double().cpu(), y.double().cpu()
        self.gram += x.T @ x
        self.cross += x.T @ y
        self.energy += float(y.square().sum())

    def relative_error(self, w: Tensor) -> float:
        """||Y - X Wᵀ|| / ||Y|| for w [d, N], from the accumulated sums alone."""
        w = w.double()
        residual = self.energy - 2 * float((w * self.cross.T).sum()) + float(((w @ self.gram) * w).sum())
        return max(residual, 0.0) ** 0.5 / max(self.energy, 1e-30) ** 0.5

    def solve(self, w0: Tensor, damp: float) -> Tensor:
        """argmin ||Y - X Wᵀ||² + λ||W - W0||², λ = damp · mean diag(XᵀX).  w0 [d, N] -> [d, N]"""
        lam = damp * float(self.gram.diagonal().mean().clamp_min(1e-30))
        gram = self.gram + lam * torch.eye(self.gram.shape[0], dtype=torch.float64)
        return torch.linalg.solve(gram, self.cross + lam * w0.T.double()).T.to(w0.dtype)


def refit_with_holdout(train: NormalEquations, held: NormalEquations, w0: Tensor, damp: float) -> tuple[Tensor, dict[str, float]]:
    """The refitted weight (or w0 when the refit does not lower the held-out error) and its metrics."""
    fitted = train.solve(w0, damp)
    before, after = held.relative_error(w0), held.relative_error(fitted)
    kept = after < before
    # refit_error_after is the error of the weights actually used: a discarded refit leaves it unchanged.
    metrics = {"refit_error_before": before, "refit_error_after": after if kept else before, "refit_kept": float(kept)}
    return (fitted if kept else w0), metrics


@torch.no_grad()
def refit_down(
    ffn: DenseFFN, order: Tensor, gates_fn, x: Tensor, config: RefitConfig, generator: torch.Generator
) -> tuple[DenseFFN, dict[str, float]]:
    """The FFN with its down projection refitted, and held-out metrics.

    order [d_ff]: dense neuron ids in block order; gates_fn(x [T, d]) -> [T, d_ff] the routing weight
    of each neuron (block order) for those tokens. x [T, d]: the layer's captured FFN inputs.
    """
    x = x.float()
    total = x.shape[0]
    held = max(1, int(round(total * config.holdout_fraction)))
    perm = torch.randperm(total, generator=generator)
    sub = ffn.to(torch.float32).select(order)  # neurons in block order, no output bias
    w0 = sub.down  # [d, N]
    stats = {"train": NormalEquations(*w0.shape[::-1]), "held": NormalEquations(*w0.shape[::-1])}
    for part, rows in (("train", perm[held:]), ("held", perm[:held])):
        for chunk in rows.sort().values.split(config.chunk):
            h = sub.intermediate(x[chunk])  # [t, N]
            stats[part].add(h * gates_fn(x[chunk]), h @ w0.T)  # target: the dense FFN output (without its bias)
    fitted, metrics = refit_with_holdout(stats["train"], stats["held"], w0, config.damp)
    if not metrics["refit_kept"]:
        return ffn, metrics
    down = ffn.down.clone()
    down[:, order] = fitted.to(down.dtype)
    return replace(ffn, down=down), metrics
