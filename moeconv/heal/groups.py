"""Which parameters heal trains, in which group, and the straight-through router gradient."""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

# Parameter groups: the router is optimised and clipped on its own (see METHODS.md, "Measured
# pitfall": a straight-through router's gradient reached 1e4-1e8 and starved everything else
# under one global clip). The other three are reported separately and clipped together ("body").
GROUPS = ("router", "ffn", "attention", "other")


BODY = ("ffn", "attention", "other")


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """(name, parameter) per group; tied parameters appear once."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():  # named_parameters already skips tied duplicates
        parts = name.split(".")
        if "router" in parts:
            groups["router"].append((name, p))
        elif "mlp" in parts or "experts" in parts or "shared" in parts:
            groups["ffn"].append((name, p))
        elif "self_attn" in parts or "attn" in parts or "attention" in parts:
            groups["attention"].append((name, p))
        else:
            groups["other"].append((name, p))
    return groups


def _straight_through_route(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard top-k with weight exactly 1, but d weight / d logits = d softmax: R + P - stopgrad(P)."""
    logits = block.router(x)  # [T, E]
    ids = torch.topk(logits, block.top_k, dim=-1, sorted=True).indices  # [T, k]
    p = logits.float().softmax(-1).gather(1, ids)  # [T, k]
    return ids, ((p - p.detach()) + 1.0).to(logits.dtype)  # exactly 1 in the forward: (p - p) is 0 first


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "router") and hasattr(m, "top_k") and hasattr(m, "route")]


@contextlib.contextmanager
def straight_through_routing(model: nn.Module, enabled: bool):
    """Patch every scoring-'none' MoE block to route straight-through while healing; restore afterwards."""
    patched = [b for b in moe_blocks(model) if enabled and getattr(b, "scoring", None) == "none"]
    for block in patched:
        block.route = types.MethodType(_straight_through_route, block)
    try:
        yield len(patched)
    finally:
        for block in patched:
            del block.route
