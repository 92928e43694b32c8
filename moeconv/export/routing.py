"""How moeconv's routing lands on a stock MoE block that weights experts by softmax router probabilities."""

# A checkpoint converted with `scoring: softmax` (and the target's renormalization) exports exactly.
# moeconv's default scoring "none" sums the k selected experts with weight 1, which no stock block does;
# it is mapped: the router weight of layer i is scaled by s_i = 2^-m (a power of two, so the scaled
# logits are the original ones times s_i exactly and the top-k choice is unchanged up to the float32
# resolution of the softmax), and every routed expert's down projection by k (renormalized targets) or E.
# A selected expert's weight k·softmax(s·l)_e / Σ_top-k is then exp(s·(l_e - mean)) ≈ 1 ± s·spread; s_i
# is chosen on check tokens so that s_i · (largest logit spread seen) <= epsilon, and the error this
# introduces is measured end to end on those tokens and reported (a later layer's near-tie can still flip
# because an earlier layer's output moved slightly: the measurement counts those too). With top_k == E the router is zeroed:
# every weight is exactly 1/E (or 1/k) and the export reproduces moeconv's model (the dense model for an
# identity conversion) up to float rounding.

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from moeconv.export.registry import ExportError
from moeconv.modeling.hf.moe_block import MoeconvMoeBlock, route

SOFTMAX_RECIPE = "configs/dot-moe-softmax.yaml"


@dataclass
class RoutingMap:
    """What the exporter does to routers and experts so that the target's routing computes moeconv's."""

    mode: str  # exact | mapped
    normalize: bool  # the target renormalizes the top-k softmax weights (Mixtral, norm_topk_prob, llama.cpp llama)
    expert_scale: float = 1.0  # factor on every routed expert's down projection
    router_scale: dict[int, float] = field(default_factory=dict)  # layer -> factor on its router weight (missing: 1)
    epsilon: float = 0.0
    measured: dict = field(default_factory=dict)

    def describe(self, top_k: int, experts: int) -> str:
        norm = "renormalized over the top-k" if self.normalize else "not renormalized"
        if self.mode == "exact" and self.expert_scale == 1.0:
            return f"exact: the checkpoint was converted with softmax scoring ({norm}), as the target routes"
        if self.mode == "exact":
            return (f"exact: top_k == experts, router zeroed so every expert weighs 1/{top_k if self.normalize else experts}, "
                    f"experts x {self.expert_scale:g} (weight-1 sum reproduced up to float rounding)")
        return (f"mapped weight-1 routing onto softmax ({norm}): router x 2^-m per layer with 2^-m * logit spread <= "
                f"{self.epsilon:g} on check tokens, experts x {self.expert_scale:g}; the error is measured, not zero")


def plan_routing(moe: dict, target: str, can_normalize: tuple[bool, ...]) -> RoutingMap:
    """The map for a checkpoint's `moe` block onto a target whose renormalization is one of `can_normalize`."""
    scoring, renorm = moe.get("scoring", "none"), bool(moe.get("renormalize", False))
    k, experts = moe["top_k"], moe["num_experts"]
    if scoring == "softmax":
        if renorm not in can_normalize:
            how = ("never renormalizes the top-k softmax weights; convert with scoring: softmax, renormalize: false"
                   if renorm else f"always renormalizes the top-k softmax weights; convert with {SOFTMAX_RECIPE} "
                   "(scoring: softmax, renormalize: true)")
            raise ExportError(f"{target} {how} for an exact export (this checkpoint: renormalize {str(renorm).lower()})")
        return RoutingMap("exact", renorm)
    if scoring != "none":
        raise ExportError(f"{target} weights experts by softmax router probabilities and this checkpoint scores them with "
                          f"{scoring}; convert with scoring: softmax ({SOFTMAX_RECIPE}) for an exact export")
    normalize = True in can_normalize
    scale = float(k if normalize else experts)
    if k == experts:
        return RoutingMap("exact", normalize, scale, {i: 0.0 for i in moe["layers"]})
    return RoutingMap("mapped", normalize, scale)


def moe_blocks(model: nn.Module, moe: dict) -> dict[int, MoeconvMoeBlock]:
    return {i: model.get_submodule(moe["ffn_path"].format(i=i)) for i in moe["layers"]}


def _capture_logits(blocks: dict[int, MoeconvMoeBlock], store: dict[int, list[torch.Tensor]]) -> list:
    def hook(i):
        return lambda module, args, out: store.setdefault(i, []).append(out.detach().reshape(-1, out.shape[-1]))

    return [b.router.register_forward_hook(hook(i)) for i, b in blocks.items()]


def _selection(logits: torch.Tensor, top_k: int, scoring: str, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids, weights = route(logits.float(), top_k, scoring, normalize)  # [T, k], [T, k]
    return ids.sort(-1).values, weights


def _next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean negative log-likelihood of each next check token.  logits [B, T, V], ids [B, T]"""
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))


def apply_routing(model: nn.Module, moe: dict, rmap: RoutingMap) -> None:
    """Make moeconv's own blocks compute what the target will (in place): the mapped model, for measuring."""
    for i, block in moe_blocks(model, moe).items():
        block.scoring, block.renormalize = "softmax", rmap.normalize
        with torch.no_grad():
            block.router.weight.mul_(rmap.router_scale.get(i, 1.0))
            for expert in block.experts:
                expert.down_proj.weight.mul_(rmap.expert_scale)


def _forward_capturing(model: nn.Module, blocks, ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, list[torch.Tensor]]]:
    """The model's logits on ids [B, T] -> [B, T, V], and each MoE layer's router logits seen on the way."""
    captured: dict[int, list[torch.Tensor]] = {}
    handles = _capture_logits(blocks, captured)
    try:
        return model(ids).logits.float(), captured
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate(model: nn.Module, moe: dict, rmap: RoutingMap, ids: torch.Tensor, epsilon: float) -> None:
    """Choose each layer's router scale on `ids` [B, T] and measure what the mapping changes (fills rmap)."""
    k = moe["top_k"]
    blocks = moe_blocks(model, moe)
    reference, logits = _forward_capturing(model, blocks, ids)  # [B, T, V], layer -> router logits
    chosen = {}
    for i, parts in logits.items():
        lg = torch.cat(parts).float()  # [N, E]
        top = lg.topk(k, dim=-1).values  # [N, k]
        spread = float((top[:, 0] - top[:, -1]).max() if rmap.normalize else (lg.max(-1).values - lg.min(-1).values).max())
        rmap.router_scale[i] = 2.0 ** math.floor(math.log2(epsilon / spread)) if spread > 0 else 1.0
        chosen[i] = _selection(lg, k, "none", False)[0]
    rmap.epsilon = epsilon
    apply_routing(model, moe, rmap)
    mapped, mapped_logits = _forward_capturing(model, blocks, ids)
    changed, rows, deviation = 0, 0, 0.0
    for i, parts in mapped_logits.items():
        sel, weights = _selection(torch.cat(parts), k, "softmax", rmap.normalize)
        same = (sel == chosen[i]).all(-1)  # [N]
        changed += int((~same).sum())
        rows += same.numel()
        if same.any():
            deviation = max(deviation, float((weights[same] * rmap.expert_scale - 1).abs().max()))
    diff = (mapped - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-30)  # [B, T]
    rmap.measured = {
        "check_nll": _next_token_nll(reference, ids),
        "check_nll_mapped": _next_token_nll(mapped, ids),
        "check_tokens": int(ids.numel()),
        "logits_rel_error": float((mapped - reference).norm() / reference.norm()),
        "max_token_rel_error": float(diff.max()),
        "max_weight_deviation": deviation,
        "topk_changed_fraction": changed / max(rows, 1),
        "router_scale_log2": {str(i): int(math.log2(s)) for i, s in rmap.router_scale.items()},
    }
