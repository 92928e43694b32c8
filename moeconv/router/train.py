"""Layer-local router training: learn W_r [E, d] so that top-k of x W_rᵀ picks the oracle's experts."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from moeconv.config import RouterConfig
from moeconv.errors import RecipeError
from moeconv.ffn import DenseFFN
from moeconv.router.reference import (
    expert_importance_from_h,
    expert_mask,
    grouped_down,
    oracle_selection,
    relative_error,
    select_top_k,
)
from moeconv.schedule import warmup_cosine

logger = logging.getLogger(__name__)


def split_calibration(calib: Tensor, config: RouterConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Disjoint (train, held-out) rows of calib, drawn with the generator."""
    total = calib.shape[0]
    holdout = min(config.max_holdout, max(1, int(round(total * config.holdout_fraction))))
    if total - holdout < 1:
        raise RecipeError(f"router training needs at least 2 calibration tokens, got {total}; capture more tokens")
    order = torch.randperm(total, generator=generator)
    train_rows = order[holdout : holdout + config.max_tokens].sort().values
    held_rows = order[:holdout].sort().values
    return calib[train_rows], calib[held_rows]


def router_loss(logits: Tensor, importance: Tensor, top_k: int, config: RouterConfig) -> Tensor:
    """Per-token loss of router logits [B, E] against the oracle importance [B, E]; returns [B]."""
    if config.loss == "bce":
        target = oracle_selection(importance, top_k)  # [B, E]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
    if config.loss == "topk_ce":
        target = oracle_selection(importance, top_k) / top_k  # [B, E]
    else:
        target = torch.softmax(2 * importance.clamp_min(1e-12).log() / config.temperature, dim=1)  # [B, E]
    return -(target * torch.log_softmax(logits, dim=1)).sum(1)


def train_router(
    ffn: DenseFFN,
    assignment: Tensor,
    calib: Tensor,
    top_k: int,
    config: RouterConfig,
    generator: torch.Generator,
    init: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Router weight [E, d] (nn.Linear layout, no bias) and held-out metrics.

    Metrics: router_recall (mean overlap of the chosen top-k with the oracle top-k by expert output
    norm), load_max_over_mean (expert load balance on held-out rows), rel_error (relative L2 error of the MoE output vs the dense FFN), oracle_rel_error (the same
    with oracle routing: the floor this partition allows), init_recall when an init is given.
    """
    num_experts = int(assignment.max()) + 1
    if not 1 <= top_k <= num_experts:
        raise RecipeError(f"top_k={top_k} must be between 1 and the number of experts ({num_experts})")
    x_train, x_held = split_calibration(calib.float(), config, generator)
    ffn32 = ffn.to(torch.float32)
    neuron_index, gram = grouped_down(ffn32, assignment, num_experts)
    with torch.no_grad():
        importance = expert_importance_from_h(ffn32.intermediate(x_train), neuron_index, gram)  # [T, E]

    if init is not None and init.shape != (num_experts, ffn.d_model):
        raise RecipeError(f"router init has shape {tuple(init.shape)}, expected {(num_experts, ffn.d_model)}")
    weight, last_loss = fit_router(x_train, importance, top_k, config, generator, init)

    metrics = evaluate_router(ffn32, assignment, weight, top_k, x_held, neuron_index, gram)
    metrics["train_loss"] = last_loss
    metrics["train_tokens"] = float(x_train.shape[0])
    if init is not None:
        metrics["init_recall"] = evaluate_router(ffn32, assignment, init.float(), top_k, x_held, neuron_index, gram)[
            "router_recall"
        ]
    logger.debug("router trained: %s", metrics)
    return weight, metrics


def fit_router(
    x: Tensor,
    importance: Tensor,
    top_k: int,
    config: RouterConfig,
    generator: torch.Generator,
    init: Tensor | None = None,
) -> tuple[Tensor, float]:
    """Router weight [E, d] fitted so that top-k of x Wᵀ matches the oracle: x [T, d], importance [T, E].

    Returns (weight, last training loss). AdamW with cosine decay, clipped, minibatches drawn with generator.
    """
    energy = importance.square().sum(1)  # [T]  ~ the token's share of output energy (cross terms ignored)
    token_weight = energy / energy.mean().clamp_min(1e-30) if config.token_weighting else torch.ones_like(energy)
    if init is None:
        weight = torch.zeros(importance.shape[1], x.shape[1])
    else:
        weight = init.detach().float().clone()
    weight.requires_grad_(True)
    optimizer = torch.optim.AdamW([weight], lr=config.lr, weight_decay=config.weight_decay)
    batch = min(config.batch, x.shape[0])
    last_loss = float("nan")
    for step in range(config.steps):
        rows = torch.randint(x.shape[0], (batch,), generator=generator)  # [B]
        logits = x[rows] @ weight.T  # [B, E]
        loss = (router_loss(logits, importance[rows], top_k, config) * token_weight[rows]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([weight], config.clip)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * warmup_cosine(step, config.steps, 0)
        optimizer.step()
        last_loss = float(loss.detach())
    return weight.detach(), last_loss


@torch.no_grad()
def evaluate_router(
    ffn: DenseFFN, assignment: Tensor, router: Tensor, top_k: int, x: Tensor, neuron_index: Tensor, gram: Tensor
) -> dict[str, float]:
    """Recall against the oracle and relative output error (learned and oracle routing) on rows x."""
    h = ffn.intermediate(x)  # [T, d_ff]
    dense = torch.nn.functional.linear(h, ffn.down, ffn.down_bias)  # [T, d]
    importance = expert_importance_from_h(h, neuron_index, gram)  # [T, E]
    oracle = oracle_selection(importance, top_k)  # [T, E]
    chosen = select_top_k(router, x, top_k)  # [T, E]
    routed = torch.nn.functional.linear(h * expert_mask(assignment, chosen), ffn.down, ffn.down_bias)
    best = torch.nn.functional.linear(h * expert_mask(assignment, oracle), ffn.down, ffn.down_bias)
    load = chosen.mean(0)  # [E]  share of tokens that pick each expert
    return {
        "router_recall": float((chosen * oracle).sum(1).mean() / top_k),
        "load_max_over_mean": float(load.max() / load.mean().clamp_min(1e-30)),  # 1.0 is perfectly balanced
        "rel_error": relative_error(routed, dense),
        "oracle_rel_error": relative_error(best, dense),
    }
