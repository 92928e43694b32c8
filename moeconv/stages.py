"""Per-layer conversion stages: shared-neuron selection, partition, router, DAG; and the MoE block they produce."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moeconv.errors import RecipeError
from moeconv.ffn import DenseFFN
from moeconv.modeling.hf.moe_block import MoeconvMoeBlock, route
from moeconv.partition import Partitioner, select_shared_neurons
from moeconv.recipe import ConvertRecipe
from moeconv.refit import neuron_gates, refit_down
from moeconv.router import RouterConfig, train_router


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
    shared: Tensor | None = None  # [shared_size] dense neuron ids, always active
    routed: Tensor | None = None  # [d_ff - shared_size] dense neuron ids, in expert order
    router: Tensor | None = None  # [E, d]
    dag_state: dict[str, Tensor] | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def run_layer_stages(ctx: LayerContext, partitioner: Partitioner, on_stage: Callable[[str], None]) -> None:
    recipe, ffn = ctx.recipe, ctx.ffn
    all_neurons = torch.arange(ffn.d_ff)
    if recipe.shared_neurons:
        if ctx.calib is None:
            raise RecipeError("shared_neurons needs calibration data to pick the most active neurons")
        on_stage("shared")
        ctx.shared = select_shared_neurons(ffn, ctx.calib, recipe.shared_neurons)
        keep = torch.ones(ffn.d_ff, dtype=torch.bool)
        keep[ctx.shared] = False
        pool = all_neurons[keep]
    else:
        ctx.shared = all_neurons[:0]
        pool = all_neurons
    routed_ffn = ffn.select(pool)
    on_stage("partition")
    result = partitioner.partition(routed_ffn, recipe.experts, ctx.calib, ctx.generator, top_k=recipe.top_k)
    order = torch.argsort(result.assignment, stable=True)
    ctx.routed = pool[order]
    ctx.metrics.update({f"partition_{k}": v for k, v in result.metrics.items()})
    if recipe.trains_router and ctx.calib is not None:
        on_stage("router")
        router, metrics = train_router(
            routed_ffn, result.assignment, ctx.calib, recipe.top_k, RouterConfig(**recipe.router), ctx.generator, init=result.router
        )
        ctx.metrics.update(metrics)
    elif result.router is not None:
        router = result.router
    else:  # an untrained router: only sensible when every expert is selected (top_k == experts)
        router = torch.randn(recipe.experts, ffn.d_model, generator=ctx.generator) * ffn.d_model**-0.5
    ctx.router = router
    if recipe.refits and ctx.calib is not None:
        on_stage("refit")
        refit_layer(ctx)
    if recipe.dag is not None and ctx.calib is not None:
        on_stage("dag")
        from moeconv.dag import DagConfig, distill_dag

        block = build_block(ctx, ffn.d_model)
        block.dag = None  # distill_dag attaches a fresh, exactly neutral one drawn from the layer's generator
        target = ffn.forward(ctx.calib)  # [T, d] the dense FFN output the MoE should reproduce
        metrics = distill_dag(block, ctx.calib, target, DagConfig(**recipe.dag), ctx.generator)
        ctx.dag_state = {k: v.detach().clone() for k, v in block.dag.state_dict().items()}
        ctx.metrics.update({f"dag_{k}": v for k, v in metrics.items()})


def refit_layer(ctx: LayerContext) -> None:
    """Replace ctx.ffn's down projection by its least-squares refit under the layer's routing."""
    recipe, moe = ctx.recipe, ctx.moe
    router = ctx.router.float()

    def gates(x):
        ids, weights = route(x @ router.T, recipe.top_k, recipe.scoring, recipe.renormalize)
        return neuron_gates(ids, weights, moe["expert_size"], moe["num_experts"], moe.get("shared_size", 0))

    order = torch.cat([ctx.shared, ctx.routed])
    ctx.ffn, metrics = refit_down(ctx.ffn, order, gates, ctx.calib, recipe.refit)
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
        from moeconv.modeling.hf.dag import DagAggregator

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
