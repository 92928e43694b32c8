"""Layer-local distillation of a MoE block's DAG aggregator (optionally its router) to the dense FFN's output."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from moeconv.config import DagConfig, DagTrainConfig
from moeconv.errors import DataError, RecipeError
from moeconv.modeling.hf.dag import DagAggregator
from moeconv.modeling.hf.moe_block import MoeconvMoeBlock
from moeconv.schedule import warmup_cosine

logger = logging.getLogger(__name__)

EVAL_CHUNK = 4096  # tokens per no-grad forward when precomputing and evaluating


def attach_dag(block: MoeconvMoeBlock, config: DagConfig, generator: torch.Generator | None = None) -> DagAggregator:
    """Give the block a fresh aggregator (on its device and dtype); untrained, it leaves the output unchanged."""
    weight = block.router.weight
    dag = DagAggregator(weight.shape[1], block.top_k, **config.architecture())
    dag.reset_parameters(generator)
    block.dag = dag.to(device=weight.device, dtype=weight.dtype)
    return block.dag


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def relative_error(pred: Tensor, target: Tensor) -> float:
    """||pred - target|| / ||target|| over all tokens (Frobenius)."""
    return float((pred.double() - target.double()).norm() / target.double().norm().clamp_min(1e-30))


@torch.no_grad()
def block_output(block: MoeconvMoeBlock, x: Tensor) -> Tensor:
    """block(x) in chunks.  [T, d] -> [T, d]"""
    return torch.cat([block(x[i : i + EVAL_CHUNK]) for i in range(0, x.shape[0], EVAL_CHUNK)])


@torch.no_grad()
def frozen_parts(block: MoeconvMoeBlock, x: Tensor, with_slots: bool) -> tuple[Tensor | None, Tensor]:
    """The routed slots [T, k, d] (if asked) and the part of the output the aggregator never sees [T, d]."""
    slots, rest = [], []
    for i in range(0, x.shape[0], EVAL_CHUNK):
        chunk = x[i : i + EVAL_CHUNK]  # [C, d]
        if with_slots:
            ids, weights = block.route(chunk)  # [C, k], [C, k]
            slots.append(block.routed_outputs(chunk, ids, weights))  # [C, k, d]
        part = torch.zeros_like(chunk)
        if block.shared is not None:
            part = part + block.shared(chunk)
        if block.down_bias is not None:
            part = part + block.down_bias
        rest.append(part)
    return (torch.cat(slots) if with_slots else None), torch.cat(rest)


def schedule(step: int, config: DagTrainConfig) -> float:
    """Learning-rate factor: linear warm-up ((step + 1) / (warmup + 1)), then cosine decay to 0."""
    return warmup_cosine(step, config.steps, config.warmup, warmup_offset=1)

def check_inputs(block: MoeconvMoeBlock, x: Tensor, y: Tensor, config: DagTrainConfig) -> None:
    hidden = block.router.weight.shape[1]
    if x.ndim != 2 or x.shape[1] != hidden or y.shape != x.shape:
        raise DataError(
            f"DAG distillation needs inputs X and targets Y of shape [T, {hidden}], got {list(x.shape)} and "
            f"{list(y.shape)}; capture the FFN inputs and the dense FFN outputs of the same tokens"
        )
    if x.shape[0] < 2:
        raise DataError(f"DAG distillation needs at least 2 captured tokens, got {x.shape[0]}; capture more tokens")
    if config.train_router and block.scoring == "none":
        raise RecipeError(
            "dag.train_router needs router scoring 'softmax' or 'sigmoid' (with scoring 'none' the router gets no "
            "gradient); set train_router: false or change the router scoring"
        )


def distill_dag(
    block: MoeconvMoeBlock, x: Tensor, y: Tensor, config: DagConfig | DagTrainConfig, generator: torch.Generator
) -> dict[str, float]:
    """Train block.dag (attached first, shaped by config, if absent) so that block(x) ≈ y; returns metrics.

    x: captured FFN inputs [T, d]; y: the dense FFN's outputs on them [T, d]. Minimises the
    normalised MSE Σ‖block(x) − y‖² / Σ‖y‖² on minibatches (AdamW, warm-up + cosine). Only the
    aggregator is trained, plus the router when config.train_router. The block is trained in float32
    and returned to its dtype. Deterministic for a given generator state (and thread count).

    An aggregator (and router) that does not lower the held-out error is put back to its initial, exactly
    neutral state: the block then computes the plain MoE sum (dag_kept 0).

    Metrics: rel_error_before / rel_error_after (held-out ‖block(x) − y‖ / ‖y‖), dag_kept, train_rel_error_after,
    train_loss (last step), train_tokens, holdout_tokens, dag_params, dag_param_fraction (of the rest of the block).
    """
    shape, train = (config, config.train) if isinstance(config, DagConfig) else (DagConfig(train=config), config)
    check_inputs(block, x, y, train)
    held, kept = split_rows(x.shape[0], train, generator)  # drawn first: the split does not depend on the aggregator's shape
    if block.dag is None:
        attach_dag(block, shape, generator)
    dtype = block.router.weight.dtype
    device = block.router.weight.device
    grad_flags = {name: p.requires_grad for name, p in block.named_parameters()}
    block.float()
    try:
        x, y = x.to(device, torch.float32), y.to(device, torch.float32)
        return train_in_float32(block, x[kept], y[kept], x[held], y[held], train, generator)
    finally:
        block.to(dtype)
        for name, p in block.named_parameters():
            p.requires_grad_(grad_flags[name])


def split_rows(total: int, config: DagTrainConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Disjoint (held-out, training) row indices, at least one of each. Captured rows come window by window, so the
    held-out rows are the last ones (whole windows, not tokens that share context with training rows); training
    rows are drawn from the rest."""
    holdout = min(config.max_holdout, max(1, round(total * config.holdout_fraction)), total - 1)
    order = torch.randperm(total - holdout, generator=generator)
    return torch.arange(total - holdout, total), order[: config.max_tokens].sort().values


def train_in_float32(
    block: MoeconvMoeBlock,
    x_train: Tensor,
    y_train: Tensor,
    x_held: Tensor,
    y_held: Tensor,
    config: DagTrainConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    rel_before = relative_error(block_output(block, x_held), y_held)
    # Without router training the routed slots never change: compute the experts once, then each
    # step only runs the aggregator (the cost that makes this affordable on CPU).
    slots, rest = frozen_parts(block, x_train, with_slots=not config.train_router)
    target = y_train - rest  # [N, d]  what routed experts + aggregator must produce

    dag = block.dag
    for p in block.parameters():
        p.requires_grad_(False)
    groups = [{"params": list(dag.parameters()), "lr": config.lr, "peak": config.lr}]
    if config.train_router:
        groups.append({"params": list(block.router.parameters()), "lr": config.router_lr, "peak": config.router_lr})
    trained = [p for g in groups for p in g["params"]]
    initial = [p.detach().clone() for p in trained]  # W_up = 0: exactly the plain MoE
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)

    batch = min(config.batch, x_train.shape[0])
    last_loss = float("nan")
    for step in range(config.steps):
        rows = torch.randint(x_train.shape[0], (batch,), generator=generator).to(x_train.device)  # [B]
        xb = x_train[rows]  # [B, d]
        if slots is None:
            ids, weights = block.route(xb)  # [B, k], [B, k]  weights carry the router's gradient
            pred = dag(block.routed_outputs(xb, ids, weights), xb)  # [B, d]
        else:
            pred = dag(slots[rows], xb)  # [B, d]
        tb = target[rows]  # [B, d]
        loss = (pred - tb).square().sum() / tb.square().sum().clamp_min(1e-30)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, config.clip)
        factor = schedule(step, config)
        for group in optimizer.param_groups:
            group["lr"] = group["peak"] * factor
        optimizer.step()
        last_loss = float(loss.detach())
    for p in trained:
        p.requires_grad_(False)
    rel_after = relative_error(block_output(block, x_held), y_held)
    kept = rel_after < rel_before
    if not kept:
        with torch.no_grad():
            for p, start in zip(trained, initial, strict=True):
                p.copy_(start)
        rel_after = relative_error(block_output(block, x_held), y_held)

    metrics = {
        "rel_error_before": rel_before,
        "rel_error_after": rel_after,
        "dag_kept": float(kept),
        "train_rel_error_after": relative_error(block_output(block, x_train[:EVAL_CHUNK]), y_train[:EVAL_CHUNK]),
        "train_loss": last_loss,
        "train_tokens": float(x_train.shape[0]),
        "holdout_tokens": float(x_held.shape[0]),
        "dag_params": float(parameter_count(dag)),
        "dag_param_fraction": parameter_count(dag) / max(1, parameter_count(block) - parameter_count(dag)),
    }
    logger.debug("dag distilled: %s", metrics)
    return metrics
