"""Model statistics: parameters (total / active / embedding), bytes on disk, and per-layer expert load and router entropy."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from moeconv.modeling.hf.moe_block import route as moeconv_route

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


class ParameterCounts(BaseModel):
    """Active = what one token uses: every non-expert parameter plus top_k experts per MoE layer.

    Shared experts, routers and embeddings count as non-expert (always used). Quantized linears
    count their logical weights (in_features x out_features), not their packed storage.
    """

    model_config = ConfigDict(extra="forbid")

    total: int
    active: int
    embedding: int  # input embeddings, plus lm_head when it is not tied to them
    expert: int  # all routed experts' parameters
    aggregator: int = 0  # DAG-MoE aggregators (always active)
    moe_layers: int
    num_experts: int | None = None  # of the first MoE layer
    top_k: int | None = None

    @property
    def total_non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


class LayerRouting(BaseModel):
    """What the router of one MoE layer did over the evaluation tokens."""

    model_config = ConfigDict(extra="forbid")

    name: str
    layer: int
    num_experts: int
    top_k: int
    tokens: int
    load: list[float]  # share of (token, expert) selections per expert; sums to 1, balanced = 1/E
    router_entropy: float  # mean per-token entropy of softmax(router logits), nats
    router_entropy_norm: float  # router_entropy / log(E): 1 = uniform router, 0 = one expert per token
    load_entropy_norm: float  # entropy of `load` / log(E): 1 = perfectly balanced
    max_load_ratio: float  # busiest expert's load x E: 1 = balanced


@dataclass
class MoeLayer:
    """A MoE layer found in a model: a moeconv block, or a transformers sparse block (Mixtral, Qwen-MoE, OLMoE)."""

    name: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    kind: str  # "moeconv": router returns logits; "hf": gate returns (logits, scores, ids)


def find_moe_layers(model: nn.Module) -> list[MoeLayer]:
    """Duck-typed, so moeconv blocks loaded as remote code and exported formats are found too."""
    found = []
    for name, m in model.named_modules():
        experts, router, gate = getattr(m, "experts", None), getattr(m, "router", None), getattr(m, "gate", None)
        if not isinstance(experts, nn.Module):
            continue
        if isinstance(router, nn.Module) and hasattr(m, "route") and hasattr(m, "num_experts"):
            found.append(MoeLayer(name, m, router, experts, int(m.num_experts), int(m.top_k), "moeconv"))
        elif isinstance(gate, nn.Module) and hasattr(gate, "top_k") and hasattr(gate, "num_experts"):
            found.append(MoeLayer(name, m, gate, experts, int(gate.num_experts), int(gate.top_k), "hf"))
    return found


def _is_quantized_linear(m: nn.Module) -> bool:
    return not isinstance(m, nn.Linear) and isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)


def _numel(root: nn.Module, seen: set[int]) -> int:
    """Parameters under `root` not in `seen` (tied tensors count once); quantized linears by logical size."""
    total, skip = 0, set()
    for m in root.modules():
        if id(m) in skip:
            continue
        if _is_quantized_linear(m):
            skip.update(id(c) for c in m.modules())
            if id(m) not in seen:
                seen.add(id(m))
                bias = getattr(m, "bias", None)
                total += m.in_features * m.out_features + (bias.numel() if isinstance(bias, torch.Tensor) else 0)
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def count_parameters(model: nn.Module) -> ParameterCounts:
    total = _numel(model, set())
    seen: set[int] = set()
    embedding = 0
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get)() if hasattr(model, get) else None
        if isinstance(module, nn.Module):
            embedding += _numel(module, seen)
    layers = find_moe_layers(model)
    expert_total, inactive, aggregator = 0, 0, 0
    for layer in layers:
        dag = getattr(layer.block, "dag", None)
        aggregator += _numel(dag, set()) if isinstance(dag, nn.Module) else 0
        experts = _numel(layer.experts, set())
        expert_total += experts
        inactive += experts - experts * layer.top_k // layer.num_experts  # all experts are the same size
    return ParameterCounts(
        total=total,
        active=total - inactive,
        embedding=embedding,
        expert=expert_total,
        aggregator=aggregator,
        moe_layers=len(layers),
        num_experts=layers[0].num_experts if layers else None,
        top_k=layers[0].top_k if layers else None,
    )


def bytes_on_disk(path: str | Path) -> int | None:
    """Size of the weight files: the file itself, or a folder's weight files (None if there are none)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        weights = [f for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES]
        return sum(f.stat().st_size for f in weights) if weights else None
    return None


class _LayerTally:
    def __init__(self, layer: MoeLayer):
        self.layer = layer
        self.counts: torch.Tensor | None = None  # [E] selections per expert
        self.entropy_sum: torch.Tensor | None = None
        self.tokens = 0

    def hook(self, module: nn.Module, args: tuple, output) -> None:
        layer = self.layer
        if layer.kind == "moeconv":
            logits = output  # [T, E]
            block = layer.block
            ids, _ = moeconv_route(logits, layer.top_k, getattr(block, "scoring", "none"), getattr(block, "renormalize", False))
        else:
            logits, ids = output[0], output[2]  # [T, E], [T, k]
        logits = logits.detach().reshape(-1, layer.num_experts).float()  # [T, E]
        logp = torch.log_softmax(logits, dim=-1)  # [T, E]
        entropy = -(logp.exp() * logp).sum(-1).sum(dtype=torch.float64)
        counts = torch.bincount(ids.reshape(-1), minlength=layer.num_experts)  # [E]
        self.counts = counts if self.counts is None else self.counts + counts
        self.entropy_sum = entropy if self.entropy_sum is None else self.entropy_sum + entropy
        self.tokens += logits.shape[0]

    def result(self) -> LayerRouting | None:
        if self.counts is None:
            return None
        layer, n = self.layer, self.layer.num_experts
        load = (self.counts.double() / self.counts.sum()).cpu()  # [E]
        log_n = math.log(n) if n > 1 else 1.0
        load_entropy = float(-(load[load > 0] * load[load > 0].log()).sum())
        router_entropy = float(self.entropy_sum) / self.tokens
        match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", layer.name)
        return LayerRouting(
            name=layer.name,
            layer=int(match.group(1)) if match else -1,
            num_experts=n,
            top_k=layer.top_k,
            tokens=self.tokens,
            load=[float(v) for v in load],
            router_entropy=router_entropy,
            router_entropy_norm=router_entropy / log_n,
            load_entropy_norm=load_entropy / log_n,
            max_load_ratio=float(load.max()) * n,
        )


class RoutingRecorder:
    """Forward hooks on every MoE layer's router that tally expert load and router entropy.

    Usage: `with RoutingRecorder(model) as rec: run(model)`, then `rec.layers()`. Tokens seen by
    several overlapping windows (strided evaluation) are counted once per forward pass.
    """

    def __init__(self, model: nn.Module):
        self.tallies = [_LayerTally(layer) for layer in find_moe_layers(model)]
        self.handles: list = []

    @property
    def has_moe(self) -> bool:
        return bool(self.tallies)

    def __enter__(self) -> RoutingRecorder:
        self.handles = [t.layer.router.register_forward_hook(t.hook) for t in self.tallies]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def layers(self) -> list[LayerRouting]:
        return [r for r in (t.result() for t in self.tallies) if r is not None]
