"""Bridge from a MoeconvMoeBlock (per-expert nn.Linear modules) to the fused moe_ffn op.

The fused op reads expert weights stacked as [E, ...]. The first fused call packs a block: each kind of
expert weight is stacked once and every expert's Parameter is re-pointed at its slice of the stack, so the
weights live once in memory (no second, stacked copy) and in-place updates (an optimizer step,
load_state_dict) reach the kernel without repacking. A decode step then costs one cheap check that the
packing still holds: every expert module and Parameter is the one packed and still views the stack.
Anything that replaces them (model.to(dtype), a swapped expert, a quantized Linear) fails the check and the
block is packed again, or falls back to the per-expert path.

At decode (at most BLOCK_MAX_TOKENS tokens) fused_moe_block runs the whole block in one native call,
moeconv_C::moe_block: router product, route(), routed and shared experts, down_bias.  The packing check then also
covers the router, the shared expert and down_bias, whose weights the call reads where they are (not stacked).
"""

from __future__ import annotations

from operator import is_

import torch
from torch import Tensor, nn

from moeconv.kernels import native
from moeconv.kernels.ops import moe_ffn_into
from moeconv.kernels.quant_api import quantized_moe_ffn
from moeconv.kernels.reference import SCORINGS

# moeconv_C::moe_block takes at most this many tokens: every one of its products is then a weight-streaming problem,
# the right path up to 32 pairs per expert (moe_ops.cpp: kStreamMaxPairsPerExpert); prefill keeps the per-op path,
# whose router GEMM and gather + GEMM win there.
BLOCK_MAX_TOKENS = 16

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
        # the router, shared expert and down_bias as packed: (owner dict, name, object); a swap of any repacks
        self.owned = [(block._modules, "router", block._modules.get("router")),
                      (block._modules, "shared", block._modules.get("shared")),
                      (block._parameters, "down_bias", block._parameters.get("down_bias"))]
        self.block_args: tuple | None = None  # moeconv_C::moe_block's weights, where it can take this block
        self.hooked: tuple[nn.Module, ...] = ()  # modules whose forward hooks the one native call would skip

    def seal(self) -> None:
        """Flatten `owned` and `links` into the lists holds() compares through map(): C-level loops, several times
        faster than a generator over the tuples (the check runs for every block on every decode step)."""
        triples = self.owned + [(modules, proj_name, proj) for modules, proj_name, proj, *_ in self.links]
        triples += [(params, name, p) for *_, params, name, p, _ in self.links]
        self._owners, self._names, self._objects = (list(column) for column in zip(*triples, strict=True))
        self._params = [p for *_, p, _ in self.links]
        self._ptrs = [ptr for *_, ptr in self.links]

    def holds(self, block: nn.Module) -> bool:
        if block.experts._modules is not self.expert_modules or list(self.expert_modules.values()) != self.experts:
            return False
        return all(map(is_, map(dict.get, self._owners, self._names), self._objects)) and (
            list(map(Tensor.data_ptr, self._params)) == self._ptrs)


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
    packing = _Packing(block, stacks, links)
    _add_block_args(block, packing)
    packing.seal()
    return packing


def _add_block_args(block: nn.Module, packing: _Packing) -> None:
    """Link the router, shared expert and down_bias into the packing (any replaced one repacks, whatever it was), and
    give it moeconv_C::moe_block's weights (detached; the data_ptr links catch a replaced .data) when the router and
    shared expert are plain Linears (bias-free router and down projection) in the experts' dtype and device."""
    router, shared, down_bias = block.router, block.shared, block.down_bias
    names = ("gate_proj", "up_proj", "down_proj")
    projections = [] if shared is None else [getattr(shared, n, None) for n in names]
    for owner, name in [(block, "router"), *((shared, n) for n in names if shared is not None)]:
        module = owner._modules.get(name)
        packing.owned.append((owner._modules, name, module))  # e.g. a shared gate_proj set where there was none
        for pname, p in ((module._parameters.items()) if isinstance(module, nn.Module) else ()):
            if p is not None:
                packing.links.append((owner._modules, name, module, module._parameters, pname, p, p.data_ptr()))
    if down_bias is not None:  # a Parameter of the block itself: its "module" is the Parameter
        packing.links.append((block._parameters, "down_bias", down_bias, block._parameters, "down_bias", down_bias,
                              down_bias.data_ptr()))

    linears = [router, *(p for p in projections if p is not None)]
    if not all(type(m) is nn.Linear for m in linears) or router.bias is not None or (
            shared is not None and (projections[1] is None or projections[2] is None or projections[2].bias is not None)):
        return
    like = packing.stacks["w_up"]
    params = [p for m in linears for p in m.parameters(recurse=False)] + ([down_bias] if down_bias is not None else [])
    if any(p.dtype != like.dtype or p.device != like.device for p in params):
        return

    def weight(m: nn.Linear | None, name: str = "weight") -> Tensor | None:
        return None if m is None or getattr(m, name) is None else getattr(m, name).detach()

    stacks = packing.stacks
    s_gate, s_up, s_down = projections or (None, None, None)
    packing.block_args = (weight(router), stacks["w_gate"], stacks["w_up"], stacks["w_down"], stacks["b_gate"],
                          stacks["b_up"], weight(s_gate), weight(s_up), weight(s_down), weight(s_gate, "bias"),
                          weight(s_up, "bias"), None if down_bias is None else down_bias.detach())
    packing.hooked = (router, *([shared, *linears[1:]] if shared is not None else []))


def _packing(block: nn.Module) -> _Packing:
    packing = block.__dict__.get("_moeconv_packing")
    if packing is None or not packing.holds(block):
        packing = _pack(block)
        block.__dict__["_moeconv_packing"] = packing  # plain attribute: not a buffer, not saved
    return packing


def packed_expert_weights(block: nn.Module) -> dict[str, Tensor | None] | None:
    """The block's expert weights as stacks (w_up/w_gate [E, s, d], w_down [E, d, s], b_up/b_gate [E, s]),
    packed on first use and repacked whenever an expert weight was replaced; None for quantized experts."""
    return _packing(block).stacks


def fused_moe_block(block, x: Tensor) -> Tensor | None:
    """The block's output for x [..., d] (router, route(), routed and shared experts, down_bias) in one
    moeconv_C::moe_block call, or None where that does not apply: more than BLOCK_MAX_TOKENS tokens, not the CPU, no
    native build for x's dtype, an activation it lacks, experts/router/shared expert that are not float Linears in x's
    dtype, or forward hooks on the router or shared expert (eval's routing statistics hook the router)."""
    if x.numel() > BLOCK_MAX_TOKENS * x.shape[-1] or x.device.type != "cpu" or not native.has_native(x.device, x.dtype):
        return None
    activation = ACTIVATION_NAMES.get(block.activation)
    packing = _packing(block)
    args = packing.block_args
    if activation is None or args is None or args[0].dtype != x.dtype or block.scoring not in SCORINGS or _global_hooks():
        return None  # (route() reads any other scoring as sigmoid; the op refuses it)
    if any(m._forward_hooks or m._forward_pre_hooks for m in packing.hooked):
        return None
    # looked up on each call (not bound once) so that benchmarks/decode_profile.py can time the op
    return torch.ops.moeconv_C.moe_block(x, args[0], block.top_k, block.scoring, block.renormalize, args[1], args[2],
                                         args[3], activation, *args[4:])


def _global_hooks() -> bool:
    return bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


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
