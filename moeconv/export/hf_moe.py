"""What the transformers-native MoE targets (Qwen2-MoE, Mixtral) share: checks, config fields, sharded writing."""

from __future__ import annotations

import json
import shutil
from abc import abstractmethod

import torch
from transformers import PretrainedConfig

from moeconv.config import parse_size
from moeconv.dtypes import DTYPES
from moeconv.export.registry import ExportError, ExportOptions, ExportPlan, ExportTarget
from moeconv.export.routing import RoutingMap, plan_routing
from moeconv.export.source import ExportSource, check_family, check_moe
from moeconv.export.tensors import MoeLayer, layer_keys_ok, read_unit, split_layer, unit_keys
from moeconv.io.writer import plan_shards, shard_name

# Files carried over from the checkpoint folder as they are.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
              "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")
COMMON_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "tie_word_embeddings",
                 "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters", "rope_theta",
                 "rope_scaling")


def common_fields(src: ExportSource) -> dict:
    """The decoder settings every llama-style target takes from the source family's config."""
    base = src.base.to_dict()
    fields = {k: base[k] for k in COMMON_FIELDS if base.get(k) is not None}
    fields["head_dim"] = src.head_dim()
    fields["dtype"] = src.dtype
    return fields


def sliding_window(src: ExportSource) -> int | None:
    """The window every layer attends within (mistral), None for full attention; qwen2's per-layer windows are copied as they are."""
    return getattr(src.base, "sliding_window", None) if src.family == "mistral" else None


def _alignment(src: ExportSource) -> list[str]:
    row = src.moe["expert_size"] * DTYPES.get(src.dtype, torch.float32).itemsize
    if row % 16 == 0:
        return []
    return [f"expert rows of {row} bytes are not a multiple of 16: transformers' default grouped_mm experts kernel refuses "
            "them; load with experts_implementation='eager'"]


class HFMoeTarget(ExportTarget):
    """A transformers-native MoE class; subclasses give its config and tensor names."""

    architecture: str
    can_normalize: tuple[bool, ...]
    holds_qkv_bias: bool = False
    holds_dense_layers: bool = False

    def cannot_hold(self) -> list[str]:
        held = ["dense models (run `moeconv convert` first)", "DAG-MoE aggregators", "moeconv quantized weights",
                "sigmoid router scoring", "non-SiLU or non-gated FFNs", "qwen3/olmo2/gemma/granite/phi3/gpt2 attention and norms"]
        return held + ([] if self.holds_qkv_bias else ["q/k/v biases (qwen2)"])

    def check(self, src: ExportSource) -> None:
        check_moe(src, self.name)
        check_family(src, self.name, self.holds_qkv_bias)
        if not self.holds_dense_layers and not layer_keys_ok(src):
            raise ExportError(f"{self.name} makes every layer a MoE layer and this checkpoint keeps some dense; "
                              "use --to qwen2_moe (mlp_only_layers)")

    @abstractmethod
    def build_config(self, src: ExportSource, rmap: RoutingMap) -> PretrainedConfig: ...

    @abstractmethod
    def layer_tensors(self, src: ExportSource, layer: int, rest: dict[str, torch.Tensor], moe: MoeLayer) -> dict[str, torch.Tensor]:
        """The layer's output tensors under the target's names."""

    shared_factor: float = 1.0  # on the shared expert's down projection (Qwen2-MoE's constant 1/2 gate)

    def unit_tensors(self, src: ExportSource, unit: int, keys: list[str], rmap: RoutingMap, meta: bool) -> dict[str, torch.Tensor]:
        tensors = read_unit(src, keys, meta)
        if unit == 0 or unit - 1 not in src.moe["layers"]:
            return tensors
        rest, moe = split_layer(src, unit - 1, tensors, rmap, self.shared_factor)
        return self.layer_tensors(src, unit - 1, rest, moe)

    def plan(self, src: ExportSource, options: ExportOptions) -> ExportPlan:
        self.check(src)
        rmap = plan_routing(src.moe, self.name, self.can_normalize)
        rmap.epsilon = options.route_epsilon
        itemsize = DTYPES.get(src.dtype, torch.float32).itemsize
        units = unit_keys(src)
        entries = [self.unit_tensors(src, u, keys, rmap, meta=True) for u, keys in enumerate(units)]
        unit_bytes = [sum(t.numel() * itemsize for t in e.values()) for e in entries]
        moe = src.moe
        return ExportPlan(
            source=str(src.path), target=self.name, architecture=self.architecture, family=src.family,
            layers=src.base.num_hidden_layers, experts=moe["num_experts"], top_k=moe["top_k"],
            expert_size=moe["expert_size"], shared_size=moe.get("shared_size", 0), routing=rmap.mode,
            routing_detail=rmap.describe(moe["top_k"], moe["num_experts"]), dtype=src.dtype,
            tensors=[n for e in entries for n in e], output_bytes=sum(unit_bytes), notes=self.notes(src) + _alignment(src),
            cannot_hold=self.cannot_hold(), routing_map=rmap,
            layout={"shards": plan_shards(unit_bytes, parse_size(options.max_shard_size))},
        )

    def notes(self, src: ExportSource) -> list[str]:
        return []

    def write(self, src: ExportSource, plan: ExportPlan, options: ExportOptions, partial, progress) -> dict:
        shards, units, rmap = plan.layout["shards"], unit_keys(src), plan.routing_map
        dtype = DTYPES.get(src.dtype, torch.float32)
        names = [shard_name(s, len(shards)) for s in range(len(shards))]
        weight_map = {}
        for s, shard_units in enumerate(shards):
            tensors = {}
            for u in shard_units:
                progress(f"writing {'globals' if u == 0 else f'layer {u}/{len(units) - 1}'}")
                tensors.update({k: v.to(dtype) for k, v in self.unit_tensors(src, u, units[u], rmap, meta=False).items()})
            partial.write_shard(names[s], tensors)
            weight_map.update(dict.fromkeys(tensors, names[s]))
        partial.write_index(weight_map, plan.output_bytes)
        config = self.build_config(src, rmap)
        partial.write_text("config.json", config.to_json_string(use_diff=False))
        copied = [f for f in SIDE_FILES if (src.path / f).is_file()]
        for f in copied:
            shutil.copyfile(src.path / f, partial.path / f)
        return {"files": sorted(copied), "config": json.loads(config.to_json_string())["architectures"]}
