"""Per-layer conversion stages: shared-neuron selection, partition, router, DAG; and the MoE block they produce."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moeconv.config import ConvertRecipe
from moeconv.dag import distill_dag
from moeconv.errors import RecipeError
from moeconv.ffn import DenseFFN
from moeconv.modeling.hf.dag import DagAggregator
from moeconv.modeling.hf.moe_block import MoeconvMoeBlock, route
from moeconv.partition import Partitioner, PartitionResult
from moeconv.refit import neuron_gates, refit_down
from moeconv.router import train_router


@dataclass
class LayerContext:
    """Everything the stages know and decide about one layer."""

    index: int
    layers: int
    ffn: DenseFFN
    recipe: ConvertRecipe
    moe: dict
    generator: torch.Generator
    calib: Tensor | None = None  # [T, d] FFN inputs captured on calibration text
    gap: Tensor | None = None  # [T, d] dense layer output minus the converted stream's: added to the refit's target
    shared: Tensor | None = None  # [shared_size] dense neuron ids, always active
    routed: Tensor | None = None  # [d_ff - shared_size] dense neuron ids, in expert order
    pool: Tensor | None = None  # [d_ff - shared_size] dense neuron ids open to the partition
    partition: PartitionResult | None = None
    router: Tensor | None = None  # [E, d]
    dag_state: dict[str, Tensor] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the refit solves (the conversion device)


def _select_shared(ctx: LayerContext, partitioner: Partitioner) -> None:
    ctx.shared, metrics = partitioner.select_shared(ctx.ffn, ctx.calib, ctx.recipe.shared_neurons)
    ctx.metrics.update({f"shared_{k}": v for k, v in metrics.items()})
    keep = torch.ones(ctx.ffn.d_ff, dtype=torch.bool)
    keep[ctx.shared] = False
    ctx.pool = torch.arange(ctx.ffn.d_ff)[keep]


def _partition(ctx: LayerContext, partitioner: Partitioner) -> None:
    recipe = ctx.recipe
    ctx.partition = partitioner.partition(ctx.ffn.select(ctx.pool), recipe.experts, ctx.calib, ctx.generator, top_k=recipe.top_k)
    ctx.routed = ctx.pool[torch.argsort(ctx.partition.assignment, stable=True)]
    ctx.metrics.update({f"partition_{k}": v for k, v in ctx.partition.metrics.items()})
    ctx.router = ctx.partition.router
    if ctx.router is None:  # untrained: only sensible when every expert is selected (top_k == experts); else the router stage follows
        d = ctx.ffn.d_model
        ctx.router = None if recipe.trains_router and ctx.calib is not None else \
            torch.randn(recipe.experts, d, generator=ctx.generator) * d**-0.5


def _train_router(ctx: LayerContext, partitioner: Partitioner) -> None:
    recipe = ctx.recipe
    ctx.router, metrics = train_router(ctx.ffn.select(ctx.pool), ctx.partition.assignment, ctx.calib, recipe.top_k,
                                       recipe.router, ctx.generator, init=ctx.partition.router)
    ctx.metrics.update(metrics)


def _refit(ctx: LayerContext, partitioner: Partitioner) -> None:
    refit_layer(ctx)


def _distill_dag(ctx: LayerContext, partitioner: Partitioner) -> None:
    block = build_block(ctx, ctx.ffn.d_model)
    block.dag = None  # distill_dag attaches a fresh, exactly neutral one drawn from the layer's generator
    target = ctx.ffn.forward(ctx.calib)  # [T, d] the dense FFN output the MoE should reproduce
    metrics = distill_dag(block, ctx.calib, target, ctx.recipe.dag, ctx.generator)
    ctx.dag_state = {k: v.detach().clone() for k, v in block.dag.state_dict().items()}
    ctx.metrics.update({f"dag_{k}": v for k, v in metrics.items()})


Stage = Callable[[LayerContext, Partitioner], None]


def layer_stages(recipe: ConvertRecipe, calibrated: bool) -> list[tuple[str, Stage]]:
    """The stages every layer runs, in order: the one list that --dry-run prints and run_layer_stages executes."""
    if recipe.shared_neurons and not calibrated:
        raise RecipeError("shared_neurons needs calibration data to pick the most active neurons")
    wanted = [("shared", _select_shared, recipe.shared_neurons > 0), ("partition", _partition, True),
              ("router", _train_router, calibrated and recipe.trains_router), ("refit", _refit, calibrated and recipe.refits),
              ("dag", _distill_dag, calibrated and recipe.dag is not None)]
    return [(name, stage) for name, stage, on in wanted if on]


def run_layer_stages(ctx: LayerContext, partitioner: Partitioner, on_stage: Callable[[str], None]) -> None:
    ctx.shared, ctx.pool = torch.arange(0), torch.arange(ctx.ffn.d_ff)  # no shared neurons unless that stage picks some
    for name, stage in layer_stages(ctx.recipe, ctx.calib is not None):
        on_stage(name)
        stage(ctx, partitioner)


def refit_layer(ctx: LayerContext) -> None:
    """Replace ctx.ffn's down projection by its least-squares refit under the layer's routing."""
    recipe, moe = ctx.recipe, ctx.moe
    router = ctx.router.float().to(ctx.device)

    def gates(x):
        ids, weights = route(x @ router.T, recipe.top_k, recipe.scoring, recipe.renormalize)
        return neuron_gates(ids, weights, moe["expert_size"], moe["num_experts"], moe.get("shared_size", 0))

    order = torch.cat([ctx.shared, ctx.routed])
    ctx.ffn, metrics = refit_down(ctx.ffn, order, gates, ctx.calib, recipe.refit, device=ctx.device, offset=ctx.gap)
    ctx.metrics.update(metrics)


def _expert_weights(ffn: DenseFFN, neurons: Tensor) -> dict[str, Tensor]:
    sub = ffn.select(neurons)
    out = {"up_proj.weight": sub.up, "down_proj.weight": sub.down}
    if sub.gate is not None:
        out["gate_proj.weight"] = sub.gate
    if sub.up_bias is not None:
        out["up_proj.bias"] = sub.up_bias
    if sub.gate_bias is not None:
        out["gate_proj.bias"] = sub.gate_bias
    return out


def build_block(ctx: LayerContext, d_model: int) -> MoeconvMoeBlock:
    """The layer's MoE block with the dense weights moved into experts (float32, CPU)."""
    block = MoeconvMoeBlock(d_model, ctx.moe)
    if ctx.moe.get("dag"):

        block.dag = DagAggregator(d_model, ctx.moe["top_k"], **ctx.moe["dag"])
    size = ctx.moe["expert_size"]
    state = {"router.weight": ctx.router, "neuron_index": torch.cat([ctx.shared, ctx.routed])}
    for e in range(ctx.moe["num_experts"]):
        for name, t in _expert_weights(ctx.ffn, ctx.routed[e * size : (e + 1) * size]).items():
            state[f"experts.{e}.{name}"] = t
    if ctx.moe.get("shared_size"):
        state.update({f"shared.{k}": v for k, v in _expert_weights(ctx.ffn, ctx.shared).items()})
    if ctx.ffn.down_bias is not None:
        state["down_bias"] = ctx.ffn.down_bias
    if ctx.dag_state is not None:
        state.update({f"dag.{k}": v for k, v in ctx.dag_state.items()})
    # Without a trained aggregator its fresh (exactly neutral) initialisation is kept.
    block.load_state_dict(state, strict=block.dag is None or ctx.dag_state is not None)
    return block
