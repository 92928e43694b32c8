"""`--to qwen2_moe`: transformers' native Qwen2MoeForCausalLM (shared expert behind a gate made an exact constant)."""

from __future__ import annotations

import torch
from transformers import Qwen2MoeConfig

from moeconv.export.hf_moe import HFMoeTarget, common_fields, sliding_window
from moeconv.export.registry import register_target
from moeconv.export.routing import RoutingMap
from moeconv.export.source import ExportSource
from moeconv.export.tensors import MoeLayer

# Qwen2-MoE multiplies its shared expert by sigmoid(w·x). With w = 0 that is sigmoid(0) = 1/2 exactly for every
# token, so the shared expert's down projection is doubled (an exact float operation) and the product is unchanged.
SHARED_GATE_COMPENSATION = 2.0


@register_target
class Qwen2MoeTarget(HFMoeTarget):
    name = "qwen2_moe"
    description = "transformers' Qwen2MoeForCausalLM (shared neurons -> shared expert; loads without remote code)"
    architecture = "Qwen2MoeForCausalLM"
    can_normalize = (False, True)  # norm_topk_prob is a config field
    holds_qkv_bias = True
    holds_dense_layers = True  # mlp_only_layers
    shared_factor = SHARED_GATE_COMPENSATION

    def notes(self, src: ExportSource) -> list[str]:
        notes = ["shared_expert_gate weight 0: sigmoid(0) = 1/2 exactly, shared expert down_proj x 2"]
        if not src.moe.get("shared_size"):
            notes.append("no shared neurons: a 1-neuron all-zero shared expert (its output is exactly 0)")
        if not src.qkv_bias:
            notes.append(f"{src.family} has no q/k/v biases: zero biases written (Qwen2-MoE always has them)")
        return notes

    def build_config(self, src: ExportSource, rmap: RoutingMap) -> Qwen2MoeConfig:
        moe, base = src.moe, src.base
        layers = base.num_hidden_layers
        fields = common_fields(src)
        window = sliding_window(src)
        if src.family == "qwen2":
            fields.update({k: getattr(base, k) for k in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")
                           if getattr(base, k, None) is not None})
        elif window is not None:
            fields.update(use_sliding_window=True, sliding_window=window, max_window_layers=layers,
                          layer_types=["sliding_attention"] * layers)
        return Qwen2MoeConfig(
            **fields,
            architectures=[self.architecture],
            num_experts=moe["num_experts"],
            num_experts_per_tok=moe["top_k"],
            moe_intermediate_size=moe["expert_size"],
            shared_expert_intermediate_size=max(moe.get("shared_size", 0), 1),
            intermediate_size=moe["expert_size"] * moe["num_experts"] + moe.get("shared_size", 0),
            norm_topk_prob=rmap.normalize,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(layers) if i not in moe["layers"]],
            qkv_bias=True,
        )

    def layer_tensors(self, src: ExportSource, layer: int, rest: dict[str, torch.Tensor], moe: MoeLayer) -> dict[str, torch.Tensor]:
        out = dict(rest)
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        for proj in ("q_proj", "k_proj", "v_proj"):
            if f"{attn}.{proj}.bias" not in out:
                weight = out[f"{attn}.{proj}.weight"]  # [out, d]
                out[f"{attn}.{proj}.bias"] = torch.zeros(weight.shape[0], device=weight.device)  # [out]
        out[f"{mlp}.gate.weight"] = moe.router  # [E, d]
        for e in range(moe.router.shape[0]):
            out[f"{mlp}.experts.{e}.gate_proj.weight"] = moe.gate[e]  # [s, d]
            out[f"{mlp}.experts.{e}.up_proj.weight"] = moe.up[e]  # [s, d]
            out[f"{mlp}.experts.{e}.down_proj.weight"] = moe.down[e]  # [d, s]
        out[f"{mlp}.shared_expert.gate_proj.weight"] = moe.shared_gate  # [S, d]
        out[f"{mlp}.shared_expert.up_proj.weight"] = moe.shared_up  # [S, d]
        out[f"{mlp}.shared_expert.down_proj.weight"] = moe.shared_down  # [d, S]
        out[f"{mlp}.shared_expert_gate.weight"] = torch.zeros(1, moe.router.shape[1], device=moe.router.device)  # [1, d]
        return out
