"""The source's tensors unit by unit (0: outside the decoder layers, i+1: layer i), and each MoE layer's experts stacked."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeconv.export.routing import RoutingMap
from moeconv.export.source import ExportSource

LAYER = "model.layers."


def unit_of(name: str) -> int:
    return int(name[len(LAYER) :].split(".")[0]) + 1 if name.startswith(LAYER) else 0


def unit_keys(src: ExportSource) -> list[list[str]]:
    """Source tensor names grouped by unit; a tied lm_head and moeconv's provenance-only neuron_index are left out."""
    units: list[list[str]] = [[] for _ in range(src.base.num_hidden_layers + 1)]
    for k in src.reader.keys():
        if (src.tied and k == "lm_head.weight") or k.endswith(".neuron_index"):
            continue
        units[unit_of(k)].append(k)
    return units


def read_unit(src: ExportSource, keys: list[str], meta: bool) -> dict[str, torch.Tensor]:
    """The unit's tensors, real or (meta=True) shape-only on the meta device."""
    if meta:
        return {k: torch.empty(src.reader.shape(k), device="meta") for k in keys}
    return {k: src.reader.get(k).float() for k in keys}


@dataclass
class MoeLayer:
    """One converted layer's FFN in the target's routing terms (float32, scaled by the routing map)."""

    router: torch.Tensor  # [E, d]
    gate: torch.Tensor  # [E, s, d]
    up: torch.Tensor  # [E, s, d]
    down: torch.Tensor  # [E, d, s]
    shared_gate: torch.Tensor  # [S, d]  S >= 1: one zero neuron stands in when the checkpoint has no shared neurons
    shared_up: torch.Tensor  # [S, d]
    shared_down: torch.Tensor  # [d, S]


def split_layer(src: ExportSource, layer: int, tensors: dict[str, torch.Tensor], rmap: RoutingMap,
                shared_factor: float = 1.0) -> tuple[dict[str, torch.Tensor], MoeLayer]:
    """(the layer's non-FFN tensors, its FFN as a MoeLayer).  shared_factor multiplies the shared down projection."""
    prefix = src.moe["ffn_path"].format(i=layer) + "."
    rest = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    ffn = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    experts = range(src.moe["num_experts"])

    def stack(name: str) -> torch.Tensor:
        return torch.stack([ffn[f"experts.{e}.{name}.weight"] for e in experts])

    d = ffn["router.weight"].shape[1]
    if src.moe.get("shared_size"):
        shared = [ffn[f"shared.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")]
    else:
        dev = ffn["router.weight"].device
        shared = [torch.zeros(1, d, device=dev), torch.zeros(1, d, device=dev), torch.zeros(d, 1, device=dev)]
    moe = MoeLayer(
        router=ffn["router.weight"] * rmap.router_scale.get(layer, 1.0),
        gate=stack("gate_proj"), up=stack("up_proj"), down=stack("down_proj") * rmap.expert_scale,
        shared_gate=shared[0], shared_up=shared[1], shared_down=shared[2] * shared_factor,
    )
    return rest, moe


def layer_keys_ok(src: ExportSource) -> bool:
    """Whether every decoder layer was converted (Mixtral and llama.cpp have no per-layer dense FFN option)."""
    return list(src.moe["layers"]) == list(range(src.base.num_hidden_layers))
