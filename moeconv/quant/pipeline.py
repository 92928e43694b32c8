"""Layer-sequential GPTQ of one decoder layer: sublayers in execution order, each MoE layer's experts as one batched problem."""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from moeconv.calib.capture import LayerRunner, StopLayer
from moeconv.quant.gptq import HessianAccumulator, gptq_quantize_batched, relative_output_error
from moeconv.quant.grids import QuantizedTensor, dequantize, quantize_rtn
from moeconv.quant.recipe import QuantRecipe

log = logging.getLogger(__name__)

EXPERT = re.compile(r"(^|\.)experts\.(\d+)\.")
KEEP_HIGH_PRECISION = re.compile(r"(^|\.)(router|dag)(\.|$)")  # routers and DAG aggregators stay as they are


@contextmanager
def per_expert_modules() -> Iterator[None]:
    """Route MoE blocks through their per-expert modules, not the fused kernel: the calibration hooks need every
    expert Linear called, and the quantized checkpoint (QuantLinear experts) runs the per-expert path too."""
    from moeconv.modeling.hf import moe_block

    saved = moe_block._fused_moe_ffn
    moe_block._fused_moe_ffn = None
    try:
        yield
    finally:
        moe_block._fused_moe_ffn = saved


def expert_pattern(name: str) -> str:
    """'mlp.experts.3.up_proj' -> 'mlp.experts.*.up_proj' (other names unchanged)."""
    return EXPERT.sub(r"\1experts.*.", name, count=1)


def weight_of(module: nn.Module) -> Tensor:
    """fp32 [out, in] weight of a Linear or a transformers Conv1D (which stores [in, out])."""
    w = module.weight.detach().float()
    return w.t().contiguous() if isinstance(module, Conv1D) else w


def _set_weight(module: nn.Module, w: Tensor) -> None:
    module.weight.data = (w.t() if isinstance(module, Conv1D) else w).contiguous().to(module.weight.dtype)


def quantizable(layer: nn.Module, prefix: str, exclude: list[str]) -> dict[str, nn.Module]:
    """Relative name -> Linear/Conv1D of `layer` that are quantized (not routers, DAGs, or excluded by pattern)."""
    found = {}
    for name, module in layer.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or KEEP_HIGH_PRECISION.search(name):
            continue
        if any(fnmatch.fnmatchcase(prefix + name, p) for p in exclude):
            continue
        found[name] = module
    return found


@dataclass
class LayerResult:
    """Quantized matrices by relative module name, and what to record in provenance."""

    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    tensors: dict[str, dict] = field(default_factory=dict)  # name -> {method, error, tokens}
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)  # expert stage -> tokens per expert
    sparse_experts: list[int] = field(default_factory=list)


def trace_stages(runner: LayerRunner, index: int, layer: nn.Module, modules: dict[str, nn.Module]) -> list[list[str]]:
    """Groups of module patterns in the order the layer calls them; a group shares one input (q/k/v, gate/up)."""
    calls: list[tuple[str, Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=name: calls.append((expert_pattern(n), a[0])))
             for name, m in modules.items()]
    seen_batches = []

    def one_batch_only(_m, _a):
        if seen_batches:
            raise StopLayer
        seen_batches.append(True)

    hooks.append(layer.register_forward_pre_hook(one_batch_only))
    try:
        runner.forward(index, layer, update=False)
    finally:
        for h in hooks:
            h.remove()
    stages: list[list[str]] = []
    group_of: dict[str, int] = {}
    prev_input, prev_group = None, None
    for pattern, x in calls:  # `calls` keeps every input alive, so identities are never reused
        if pattern not in group_of:
            if x is prev_input and prev_group == len(stages) - 1:
                stages[-1].append(pattern)
            else:
                stages.append([pattern])
            group_of[pattern] = len(stages) - 1
        prev_input, prev_group = x, group_of[pattern]
    return stages


def _expand(pattern: str, modules: dict[str, nn.Module]) -> list[str]:
    if "*" not in pattern:
        return [pattern] if pattern in modules else []
    names = [n for n in modules if expert_pattern(n) == pattern]
    return sorted(names, key=lambda n: int(EXPERT.search(n).group(2)))


def _stop(*_args) -> None:
    raise StopLayer


def _collect(runner: LayerRunner, index: int, layer: nn.Module, sources: list[nn.Module], block: nn.Module | None) -> list[HessianAccumulator]:
    """Hessians of the inputs of `sources` over all calibration batches; the forward stops once they are seen."""
    accs = [HessianAccumulator(weight_of(m).shape[1], device=runner.device) for m in sources]
    hooks = []
    for acc, m in zip(accs, sources, strict=True):
        def record(_m, a, acc=acc):
            acc.add_batch(a[0])
            if block is None:  # one shared input: everything this stage needs has been seen
                raise StopLayer
        hooks.append(m.register_forward_pre_hook(record))
    if block is not None:  # experts: wait until the whole MoE block has dispatched its tokens
        hooks.append(block.register_forward_hook(_stop))
    try:
        runner.forward(index, layer, update=False)
    finally:
        for h in hooks:
            h.remove()
    return accs


def quantize_layer(runner: LayerRunner, index: int, layer: nn.Module, modules: dict[str, nn.Module], recipe: QuantRecipe,
                   stage_done: Callable[[str], None] = lambda s: None) -> LayerResult:
    """GPTQ every module of `modules` in execution order; each is replaced in `layer` by its dequantized weight,
    so later sublayers (and the next decoder layer) see the quantized outputs of earlier ones."""
    spec, result = recipe.spec, LayerResult()
    for stage in trace_stages(runner, index, layer, modules):
        groups = [_expand(p, modules) for p in stage]  # per pattern: concrete names (one, or one per expert)
        is_experts = "*" in stage[0]
        sources = [modules[g[0]] for g in zip(*groups, strict=True)] if groups[0] else []
        block = layer.get_submodule(stage[0].split(".experts.*")[0]) if is_experts else None
        stage_done("hessian " + ",".join(stage))
        accs = _collect(runner, index, layer, sources, block)
        H = torch.stack([a.finalize() for a in accs])  # [S, in, in] one per source (expert)
        counts = [a.num_samples for a in accs]
        use_rtn = [False] * len(accs)
        if is_experts:
            result.expert_tokens[stage[0]] = counts
            pooled = sum(a.xtx for a in accs) * (2.0 / max(sum(counts), 1))  # [in, in] all tokens of the layer
            for e, n in enumerate(counts):
                if n < recipe.min_expert_tokens:
                    if recipe.sparse_experts == "pooled":
                        H[e] = pooled
                    else:
                        use_rtn[e] = True
                    if e not in result.sparse_experts:
                        result.sparse_experts.append(e)
        stage_done("gptq " + ",".join(stage))
        for names in groups:
            W = torch.stack([weight_of(modules[n]) for n in names])  # [S, out, in]
            outcomes = gptq_quantize_batched(W, H, spec, recipe.block_size, recipe.damp, recipe.act_order, names)
            for s, (name, out) in enumerate(zip(names, outcomes, strict=True)):
                q, method = out.q, "gptq"
                if use_rtn[s]:
                    q, method = quantize_rtn(W[s], spec), "rtn (too few tokens)"
                elif out.fell_back:
                    method = "rtn (cholesky failed)"
                elif is_experts and counts[s] < recipe.min_expert_tokens:
                    method = "gptq (pooled hessian)"
                error = float(relative_output_error(W[s], dequantize(q), H[s]))
                _record(result, modules[name], name, q, method, error if math.isfinite(error) else None, counts[s])
    for name in sorted(set(modules) - set(result.quantized)):  # never called on calibration data: no Hessian
        log.warning("layer %d: %s saw no calibration input; round-to-nearest", index, name)
        _record(result, modules[name], name, quantize_rtn(weight_of(modules[name]), spec), "rtn (never called)", None, 0)
    return result


def _record(result: LayerResult, module: nn.Module, name: str, q: QuantizedTensor, method: str, error: float | None,
            tokens: int) -> None:
    _set_weight(module, dequantize(q))  # later sublayers and layers see the quantized weights
    result.quantized[name] = q
    result.tensors[name] = {"method": method, "error": error, "tokens": tokens}


def rtn_layer(weights: dict[str, Tensor], recipe: QuantRecipe) -> LayerResult:
    """Round-to-nearest of every matrix given (name -> fp32 [out, in]); no calibration, no Hessian."""
    result = LayerResult()
    for name, w in weights.items():
        result.quantized[name] = quantize_rtn(w, recipe.spec)
        result.tensors[name] = {"method": "rtn", "error": None, "tokens": 0}
    return result
