"""`--to mixtral`: transformers' native MixtralForCausalLM (softmax over the top-k, no shared expert, no q/k/v biases)."""

from __future__ import annotations

import torch
from transformers import MixtralConfig

from moeconv.export.hf_moe import HFMoeTarget, common_fields, sliding_window
from moeconv.export.registry import ExportError, register_target
from moeconv.export.routing import RoutingMap
from moeconv.export.source import ExportSource
from moeconv.export.tensors import MoeLayer


@register_target
class MixtralTarget(HFMoeTarget):
    name = "mixtral"
    description = "transformers' MixtralForCausalLM (llama/mistral sources without shared neurons; loads without remote code)"
    architecture = "MixtralForCausalLM"
    can_normalize = (True,)  # Mixtral always renormalizes the top-k softmax weights

    def cannot_hold(self) -> list[str]:
        return [*super().cannot_hold(), "shared neurons (use --to qwen2_moe)"]

    def check(self, src: ExportSource) -> None:
        super().check(src)
        if src.moe.get("shared_size"):
            raise ExportError(f"mixtral has no shared expert and this checkpoint has {src.moe['shared_size']} shared neurons; "
                              "use --to qwen2_moe (its shared expert holds them exactly)")

    def build_config(self, src: ExportSource, rmap: RoutingMap) -> MixtralConfig:
        moe = src.moe
        return MixtralConfig(
            **common_fields(src),
            architectures=[self.architecture],
            num_local_experts=moe["num_experts"],
            num_experts_per_tok=moe["top_k"],
            intermediate_size=moe["expert_size"],
            sliding_window=sliding_window(src),
            router_jitter_noise=0.0,
        )

    def layer_tensors(self, src: ExportSource, layer: int, rest: dict[str, torch.Tensor], moe: MoeLayer) -> dict[str, torch.Tensor]:
        out = dict(rest)
        block = f"model.layers.{layer}.block_sparse_moe"
        out[f"{block}.gate.weight"] = moe.router  # [E, d]
        for e in range(moe.router.shape[0]):
            out[f"{block}.experts.{e}.w1.weight"] = moe.gate[e]  # [s, d]
            out[f"{block}.experts.{e}.w3.weight"] = moe.up[e]  # [s, d]
            out[f"{block}.experts.{e}.w2.weight"] = moe.down[e]  # [d, s]
        return out
