"""Bridge from a MoeconvMoeBlock (per-expert nn.Linear modules) to the fused moe_ffn op.

The fused op reads expert weights stacked as [E, ...]. The first fused call packs a block: each kind of
expert weight is stacked once and every expert's Parameter is re-pointed at its slice of the stack, so the
weights live once in memory (no second, stacked copy) and in-place updates (an optimizer step,
load_state_dict) reach the kernel without repacking. A decode step then costs one cheap check that the
packing still holds: every expert module and Parameter is the one packed and still views the stack.
Anything that replaces them (model.to(dtype), a swapped expert, a quantized Linear) fails the check and the
block is packed again, or falls back to the per-expert path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moeconv.kernels import native
from moeconv.kernels.ops import moe_ffn_into
from moeconv.kernels.quant_api import quantized_moe_ffn

# transformers' ACT2FN names -> the activations the fused op implements
ACTIVATION_NAMES = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                    "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
# the op's argument -> (projection, parameter) of each expert
_PARTS = {"w_gate": ("gate_proj", "weight"), "w_up": ("up_proj", "weight"), "w_down": ("down_proj", "weight"),
          "b_gate": ("gate_proj", "bias"), "b_up": ("up_proj", "bias")}


class _Packing:
    """A block's stacked expert weights, and what must still hold for the experts' Parameters to view them."""

    def __init__(self, block: nn.Module, stacks: dict[str, Tensor | None] | None, links: list[tuple]):
        self.expert_modules = block.experts._modules
        self.experts = list(self.expert_modules.values())
        self.stacks = stacks
        self.links = links  # (expert._modules, projection name, projection, its _parameters, name, Parameter, data_ptr)

    def holds(self, block: nn.Module) -> bool:
        if block.experts._modules is not self.expert_modules or list(self.expert_modules.values()) != self.experts:
            return False
        return all(
            modules.get(proj_name) is proj and params.get(name) is p and p.data_ptr() == ptr
            for modules, proj_name, proj, params, name, p, ptr in self.links
        )


class _Unpackable(_Packing):
    """Experts that are not plain float Linears (quantized ones): nothing stacked, while the same modules are there."""

    def __init__(self, block: nn.Module):
        links = [(e._modules, name, e._modules.get(name), None, None, None, None)
                 for e in block.experts for name in ("gate_proj", "up_proj", "down_proj")]
        super().__init__(block, None, links)

    def holds(self, block: nn.Module) -> bool:
        if block.experts._modules is not self.expert_modules or list(self.expert_modules.values()) != self.experts:
            return False
        return all(modules.get(name) is proj for modules, name, proj, *_ in self.links)


class _Mixed(_Unpackable):
    """Float experts of several dtypes or devices: not packed, and looked at again on the next call (a .to() may unify
    them without replacing any module)."""

    def holds(self, block: nn.Module) -> bool:
        return False


def _pack(block: nn.Module) -> _Packing:
    """Stack the block's expert weights and make each expert's Parameters views of the stacks (unless the experts are
    not plain float Linears of one dtype and device: quantized experts keep their own modules)."""
    experts = list(block.experts)
    for e in experts:
        for proj in (e.up_proj, e.down_proj, e.gate_proj):
            if proj is not None and not isinstance(proj, nn.Linear):
                return _Unpackable(block)
    if not experts or len({(p.dtype, p.device) for e in experts for p in e.parameters()}) != 1:
        return _Mixed(block)
    stacks: dict[str, Tensor | None] = {}
    links = []
    # A first call under inference_mode must not turn the Parameters into inference tensors (training later, e.g.
    # heal or dag after an eval, would fail): the stacks are ordinary tensors, built without autograd.
    with torch.inference_mode(False), torch.no_grad():
        for arg, (proj_name, name) in _PARTS.items():
            members = [getattr(e, proj_name) for e in experts]
            if members[0] is None or getattr(members[0], name) is None:
                stacks[arg] = None
                continue
            stack = torch.stack([getattr(m, name).detach() for m in members])  # [E, ...]
            for e, (expert, proj) in enumerate(zip(experts, members, strict=True)):
                param = getattr(proj, name)
                param.data = stack[e]  # the Parameter object stays (optimizers, hooks); its storage is the stack's slice
                links.append((expert._modules, proj_name, proj, proj._parameters, name, param, param.data_ptr()))
            stacks[arg] = stack
    return _Packing(block, stacks, links)


def packed_expert_weights(block: nn.Module) -> dict[str, Tensor | None] | None:
    """The block's expert weights as stacks (w_up/w_gate [E, s, d], w_down [E, d, s], b_up/b_gate [E, s]),
    packed on first use and repacked whenever an expert weight was replaced; None for quantized experts."""
    packing = block.__dict__.get("_moeconv_packing")
    if packing is None or not packing.holds(block):
        packing = _pack(block)
        block.__dict__["_moeconv_packing"] = packing  # plain attribute: not a buffer, not saved
    return packing.stacks


def fused_moe_ffn(block, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor | None:
    """Σ of the selected experts' weighted outputs through the native op (the quantized one for quantized experts),
    or None when it cannot run here (no native build for this device/dtype, an activation it lacks, experts it
    cannot take).

    x [T, d], ids/weights [T, k].  The block's own shapes are checked when it is packed; the native op checks
    the per-call tensors itself, so the decode path skips the public op's Python checks.
    """
    activation = ACTIVATION_NAMES.get(block.activation)
    if activation is None or not native.has_native(x.device, x.dtype):
        return None
    w = packed_expert_weights(block)
    if w is None:  # quantized experts: one moeconv::quant_moe_ffn call for the step, or None where it does not apply
        experts = list(block.experts)
        if not all(hasattr(e.up_proj, "fmt") for e in experts):  # float experts of mixed dtypes: the per-expert loop
            return None
        return quantized_moe_ffn(x, ids, weights.to(x.dtype), experts, activation)
    if w["w_up"].dtype != x.dtype or w["w_up"].device != x.device:
        return None
    out = torch.empty_like(x, memory_format=torch.contiguous_format)  # [T, d]
    moe_ffn_into(out, x, ids, weights.to(x.dtype), w["w_gate"], w["w_up"],
                 w["w_down"], activation, w["b_gate"], w["b_up"])
    return out
