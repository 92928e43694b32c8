"""DOT-MoE, layer-local: a balanced optimal-transport partition learned jointly with a top-k router."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from moeconv.config import RouterConfig
from moeconv.ffn import DenseFFN
from moeconv.partition.coact import CoactPartitioner, subsample_rows
from moeconv.partition.kmeans import KMeansPartitioner
from moeconv.partition.registry import Partitioner, PartitionResult, register_partitioner
from moeconv.partition.sinkhorn import greedy_balanced_assignment, one_hot_assignment, sinkhorn_plan
from moeconv.router.reference import expert_importance_from_h, grouped_down
from moeconv.router.train import fit_router
from moeconv.schedule import warmup_cosine

logger = logging.getLogger(__name__)


class DotConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(80, ge=1, description="optimizer steps")
    batch: int = Field(512, ge=1, description="tokens per step")
    max_tokens: int = Field(16384, ge=16, description="calibration tokens drawn for training")
    init: Literal["normal", "kmeans", "coact"] = Field("coact", description="start of the affinity logits A")
    init_std: float = Field(0.01, ge=0, description="std of the N(0, std²) part of A's start")
    init_scale: float = Field(1.0, ge=0, description="logit given to the cheap partition's expert when init != normal")
    router_warmup_steps: int = Field(
        50, ge=0, description="steps fitting the router to the starting partition's oracle before joint training"
    )
    lr_affinity: float = Field(5e-2, gt=0, description="AdamW peak lr of A")
    lr_router: float = Field(1e-3, gt=0, description="AdamW peak lr of the router during joint training")
    weight_decay: float = Field(1e-4, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="linear lr warm-up, then cosine to 0")
    sinkhorn_iterations: int = Field(10, ge=1)
    tau_start: float = Field(1.0, gt=0)
    tau_end: float = Field(0.1, gt=0)
    tau_anneal_fraction: float = Field(0.2, ge=0, le=1, description="share of steps over which tau goes start -> end")
    loss: Literal["nmse", "mse"] = Field("nmse", description="nmse: squared error / squared dense output norm")
    z_loss: float = Field(1e-3, ge=0, description="weight of the router z-loss (mean logsumexp²)")
    balance_loss: float = Field(1e-2, ge=0, description="weight of the Switch load-balance loss E·Σ f_e P̄_e")
    clip_affinity: float = Field(1.0, gt=0, description="gradient norm clip of A")
    clip_router: float = Field(1.0, gt=0, description="gradient norm clip of the router, applied on its own")


def tau_at(step: int, config: DotConfig) -> float:
    """Linear tau anneal from tau_start to tau_end over the first tau_anneal_fraction of steps."""
    span = config.tau_anneal_fraction * config.steps
    if span <= 0 or step >= span:
        return config.tau_end
    return config.tau_start + (config.tau_end - config.tau_start) * step / span


def lr_scale_at(step: int, config: DotConfig) -> float:
    return warmup_cosine(step, config.steps, int(config.warmup_fraction * config.steps))


def straight_through_top_k(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """(R_ste, P): hard top-k one-hot in the forward pass, softmax gradient in the backward pass. [B, E]"""
    probs = torch.softmax(logits, dim=1)  # [B, E]
    chosen = logits.topk(top_k, dim=1).indices  # [B, k]
    hard = torch.zeros_like(probs).scatter_(1, chosen, 1.0)  # [B, E]
    return hard + probs - probs.detach(), probs


def straight_through_plan(affinity: Tensor, capacity: int, tau: float, iterations: int) -> tuple[Tensor, Tensor]:
    """(M_ste, hard assignment): greedy-rounded plan forward, Sinkhorn plan gradient backward. [d_ff, E]"""
    soft = sinkhorn_plan(affinity, capacity, iterations, tau)  # [d_ff, E]
    assignment = greedy_balanced_assignment(soft, capacity)  # [d_ff]
    hard = one_hot_assignment(assignment, affinity.shape[1], soft.dtype)  # [d_ff, E]
    return hard + soft - soft.detach(), assignment


def initial_affinity(
    ffn: DenseFFN, num_experts: int, calib: Tensor, config: DotConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor | None]:
    """A [d_ff, E] = N(0, init_std²) (+ init_scale on the cheap partition's expert). Also that partition."""
    noise = torch.randn(ffn.d_ff, num_experts, generator=generator) * config.init_std  # [d_ff, E]
    if config.init == "normal":
        return noise, None
    cheap = CoactPartitioner() if config.init == "coact" else KMeansPartitioner()
    start = cheap.partition(ffn, num_experts, calib, generator).assignment  # [d_ff]
    return noise + config.init_scale * one_hot_assignment(start, num_experts), start


def dot_loss(
    affinity: Tensor,
    router: Tensor,
    x: Tensor,
    h: Tensor,
    y: Tensor,
    down_t: Tensor,
    capacity: int,
    top_k: int,
    tau: float,
    config: DotConfig,
) -> tuple[Tensor, Tensor]:
    """(total loss, fit term) of one batch: x [B, d] inputs, h [B, d_ff] dense activations,
    y [B, d] dense output (no bias), down_t [d_ff, d]; affinity [d_ff, E], router [E, d]."""
    num_experts = affinity.shape[1]
    plan_ste, _ = straight_through_plan(affinity, capacity, tau, config.sinkhorn_iterations)  # [d_ff, E]
    logits = x @ router.T  # [B, E]
    route_ste, probs = straight_through_top_k(logits, top_k)  # [B, E]
    mask = route_ste @ plan_ste.T  # [B, d_ff]
    student = (h * mask) @ down_t  # [B, d]
    error = (student - y).square().sum()
    fit = error / y.square().sum().clamp_min(1e-30) if config.loss == "nmse" else error / y.numel()
    z_loss = torch.logsumexp(logits, dim=1).square().mean()
    load = route_ste.detach().mean(0) / top_k  # [E]  fraction of routed slots per expert
    balance = num_experts * (load * probs.mean(0)).sum()
    return fit + config.z_loss * z_loss + config.balance_loss * balance, fit.detach()


@register_partitioner("dot")
class DotPartitioner(Partitioner):
    """Learn A [d_ff, E] and W_r [E, d] so that the top-k-routed, balanced-partitioned FFN matches the dense one.

    Student output per token: (H ⊙ (R_ste M_steᵀ)) W_dᵀ, with H the dense intermediate activations.
    Needs the MoE's top_k (pass it to partition(); defaults to max(1, E // 4) with a warning).
    """

    Config = DotConfig
    needs_calibration = True

    def work(self, tokens: int, d: int, d_ff: int) -> float:
        """The dense activations and outputs of the drawn tokens, the cheap start's activations, and per step the
        masked down projection forward and backward ([B, d_ff] x [d_ff, d] twice); Sinkhorn and AdamW are not counted."""
        config: DotConfig = self.config
        t = min(tokens, config.max_tokens)
        start = 4.0 * t * d * d_ff if config.init != "normal" else 0.0
        return 6.0 * t * d * d_ff + start + 4.0 * config.steps * min(config.batch, t) * d * d_ff

    def _partition(
        self, ffn: DenseFFN, num_experts: int, calib: Tensor | None, generator: torch.Generator, top_k: int | None
    ) -> PartitionResult:
        assert calib is not None
        config: DotConfig = self.config
        if top_k is None:
            top_k = max(1, num_experts // 4)
            logger.warning("dot partitioner: no top_k given, training the partition for top_k=%d", top_k)
        capacity = ffn.d_ff // num_experts
        ffn32 = ffn.to(torch.float32)

        tokens = subsample_rows(calib.float(), config.max_tokens, generator)  # [T, d]
        affinity, start = initial_affinity(ffn32, num_experts, tokens, config, generator)
        affinity.requires_grad_(True)
        router = torch.randn(num_experts, ffn.d_model, generator=generator) * 0.01  # [E, d]
        with torch.no_grad():
            h_all = ffn32.intermediate(tokens)  # [T, d_ff]
            y_all = h_all @ ffn32.down.T  # [T, d]  the dense output without its bias
        if start is not None and config.router_warmup_steps > 0:
            # A random router would route tokens to the wrong experts and the first gradients would
            # pull neurons out of a good starting partition; fit the router to that partition first.
            neuron_index, gram = grouped_down(ffn32, start, num_experts)
            importance = expert_importance_from_h(h_all, neuron_index, gram)  # [T, E]
            warmup = RouterConfig(steps=config.router_warmup_steps, batch=config.batch)
            router, _ = fit_router(tokens, importance, top_k, warmup, generator, init=router)
        router.requires_grad_(True)
        down_t = ffn32.down.T.contiguous()  # [d_ff, d]

        optimizer = torch.optim.AdamW(
            [
                {"params": [affinity], "lr": config.lr_affinity, "peak": config.lr_affinity},
                {"params": [router], "lr": config.lr_router, "peak": config.lr_router},
            ],
            weight_decay=config.weight_decay,
        )
        batch = min(config.batch, tokens.shape[0])
        history: list[float] = []
        for step in range(config.steps):
            tau = tau_at(step, config)
            rows = torch.randint(tokens.shape[0], (batch,), generator=generator)  # [B]
            x, h, y = tokens[rows], h_all[rows], y_all[rows]
            loss, fit = dot_loss(affinity, router, x, h, y, down_t, capacity, top_k, tau, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Separate clips: the straight-through router path can carry gradients orders of magnitude
            # larger than A's, and one global clip would starve A.
            torch.nn.utils.clip_grad_norm_([affinity], config.clip_affinity)
            torch.nn.utils.clip_grad_norm_([router], config.clip_router)
            for group in optimizer.param_groups:
                group["lr"] = group["peak"] * lr_scale_at(step, config)
            optimizer.step()
            history.append(float(fit))

        with torch.no_grad():
            plan = sinkhorn_plan(affinity, capacity, config.sinkhorn_iterations, config.tau_end)
            assignment = greedy_balanced_assignment(plan, capacity)
        tail = history[-max(1, len(history) // 10) :]
        metrics = {
            "train_fit_first": history[0],
            "train_fit_last": sum(tail) / len(tail),
            "top_k": float(top_k),
            "plan_confidence": float(plan.max(dim=1).values.mean()),
        }
        if start is not None:
            metrics["moved_from_init"] = float((assignment != start).float().mean())
        return PartitionResult(assignment=assignment, router=router.detach().clone(), metrics=metrics)
