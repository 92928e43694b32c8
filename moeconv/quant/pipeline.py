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
from moeconv.config import QuantRecipe
from moeconv.quant.gptq import HessianAccumulator, gptq_quantize_batched, output_error_terms, relative_error_of
from moeconv.quant.grids import QuantizedTensor, dequantize, quantize_rtn
from moeconv.quant.output_cache import OutputCache

log = logging.getLogger(__name__)

EXPERT = re.compile(r"(^|\.)experts\.(\d+)\.")
KEEP_HIGH_PRECISION = re.compile(r"(^|\.)(router|dag)(\.|$)")  # routers and DAG aggregators stay as they are


@contextmanager
def per_expert_modules(root: nn.Module) -> Iterator[None]:
    """Inside the block, every MoE block under `root` runs its experts as their own modules, never the fused kernel:
    the calibration hooks need every expert Linear called, and the quantized checkpoint (QuantLinear experts) runs
    the per-expert path too. Only these instances change."""
    blocks = [m for m in root.modules() if hasattr(m, "use_fused_kernel")]
    saved = [block.use_fused_kernel for block in blocks]
    for block in blocks:
        block.use_fused_kernel = False
    try:
        yield
    finally:
        for block, flag in zip(blocks, saved, strict=True):
            block.use_fused_kernel = flag


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


def _collect(runner: LayerRunner, index: int, layer: nn.Module, sources: list[nn.Module], block: nn.Module | None,
             cache: OutputCache) -> list[HessianAccumulator]:
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
        cache.new_pass()
        runner.forward(index, layer, update=False)
    finally:
        for h in hooks:
            h.remove()
    return accs


def quantize_layer(runner: LayerRunner, index: int, layer: nn.Module, modules: dict[str, nn.Module], recipe: QuantRecipe,
                   stage_done: Callable[[str], None] = lambda s: None, stage_cache: dict | None = None,
                   update_hidden: bool = False) -> LayerResult:
    """GPTQ every module of `modules` in execution order; each is replaced in `layer` by its dequantized weight,
    so later sublayers (and the next decoder layer) see the quantized outputs of earlier ones.

    Modules of one stage share their input, hence their Hessian: their rows are stacked into one GPTQ problem per
    source (per expert for expert stages), and the experts of a stage are one batch. `stage_cache` (one dict per
    model) keeps the traced call order of each layer structure, so the trace forward runs once per structure.
    Finished submodules replay their outputs (OutputCache): each stage's forward recomputes only what changed.
    `update_hidden`: finally run the quantized layer on every batch to produce the next layer's inputs."""
    cache = OutputCache(layer, modules)
    try:
        return _quantize_stages(runner, index, layer, modules, recipe, stage_done, stage_cache, update_hidden, cache)
    finally:
        cache.close()


def _quantize_stages(runner: LayerRunner, index: int, layer: nn.Module, modules: dict[str, nn.Module], recipe: QuantRecipe,
                     stage_done: Callable[[str], None], stage_cache: dict | None, update_hidden: bool,
                     cache: OutputCache) -> LayerResult:
    spec, clip, result = recipe.spec, recipe.clip, LayerResult()
    key = (type(layer).__name__, tuple(sorted(expert_pattern(n) for n in modules)))
    if stage_cache is None or key not in stage_cache:
        stages = trace_stages(runner, index, layer, modules)
        if stage_cache is not None:
            stage_cache[key] = stages
    for stage in stage_cache[key] if stage_cache is not None else stages:
        groups = [_expand(p, modules) for p in stage]  # per pattern: concrete names (one, or one per expert)
        if not groups[0]:
            continue
        is_experts = "*" in stage[0]
        per_source = list(zip(*groups, strict=True))  # per source (expert): the names of the stage's modules
        block = layer.get_submodule(stage[0].split(".experts.*")[0]) if is_experts else None
        stage_done("hessian " + ",".join(stage))
        accs = _collect(runner, index, layer, [modules[names[0]] for names in per_source], block, cache)
        counts = [a.num_samples for a in accs]
        pooled = sum(a.xtx for a in accs) * (2.0 / max(sum(counts), 1)) if is_experts else None  # [in, in] the layer's tokens
        H = [a.finalize() for a in accs]  # [in, in] one per source (expert)
        del accs  # their sums: H takes their place, not a second copy (0.5 GiB for 8 experts at 8B)
        use_rtn = [False] * len(H)
        if is_experts:
            result.expert_tokens[stage[0]] = counts
            for e, n in enumerate(counts):
                if n < recipe.min_expert_tokens:
                    if recipe.sparse_experts == "pooled":
                        H[e] = pooled
                    else:
                        use_rtn[e] = True
                    if e not in result.sparse_experts:
                        result.sparse_experts.append(e)
        stage_done("gptq " + ",".join(stage))
        rows = [weight_of(modules[n]).shape[0] for n in per_source[0]]
        bounds = torch.tensor([0, *rows]).cumsum(0).tolist()  # row ranges of the modules
        quantized, terms, outcomes = [], [], []
        for chunk in _chunks(len(per_source), sum(rows), H[0].shape[0]):
            W = torch.stack([torch.cat([weight_of(modules[n]) for n in per_source[s]]) for s in chunk])  # [S', Σout, in]
            done = gptq_quantize_batched(W, torch.stack([H[s] for s in chunk]), spec, recipe.block_size, recipe.damp,
                                         recipe.act_order, ["+".join(per_source[s]) for s in chunk], clip)
            for j, s in enumerate(chunk):
                q = quantize_rtn(W[j], spec, clip) if use_rtn[s] else done[j].q
                quantized.append(q)
                terms.append(output_error_terms(W[j], dequantize(q), H[s]) if use_rtn[s] else done[j].row_terms)
            outcomes += done
            del W, done
        terms = torch.stack(terms)  # [S, Σout, 2]
        for m, (r0, r1) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            errors = relative_error_of(terms[:, r0:r1]).tolist()  # [S] error of module m in each source
            for s, names in enumerate(per_source):
                method = "gptq"
                if use_rtn[s]:
                    method = "rtn (too few tokens)"
                elif outcomes[s].fell_back:
                    method = "rtn (cholesky failed)"
                elif is_experts and counts[s] < recipe.min_expert_tokens:
                    method = "gptq (pooled hessian)"
                error = errors[s] if math.isfinite(errors[s]) else None
                _record(result, modules[names[m]], names[m], rows_of(quantized[s], r0, r1), method, error, counts[s])
        cache.update(set(result.quantized))
    for name in sorted(set(modules) - set(result.quantized)):  # never called on calibration data: no Hessian
        log.warning("layer %d: %s saw no calibration input; round-to-nearest", index, name)
        _record(result, modules[name], name, quantize_rtn(weight_of(modules[name]), spec, clip), "rtn (never called)", None, 0)
    if update_hidden:
        stage_done("forward (quantized)")
        cache.update(set(result.quantized))
        cache.new_pass()
        runner.forward(index, layer, update=True)  # the next layer's inputs come from this quantized layer
    return result


# The working set one batched GPTQ call may take: the experts of a stage are split into calls of at most this much
# (SmolLM2's experts stay one call; at 8B width an expert's gate+up problem is ~0.8 GiB, so they go one at a time
# instead of 5 GiB for all eight).
GPTQ_BATCH_BYTES = 1 << 30


def _chunks(sources: int, rows: int, cols: int) -> list[range]:
    """Consecutive ranges of the `sources` problems [rows, cols] (Hessian [cols, cols]), each within GPTQ_BATCH_BYTES:
    about six float32 copies of each matrix live at once (weights, sweep, clip search, error terms; Hessian, its
    permutation, Cholesky factor and inverse)."""
    per_problem = 6 * 4 * (rows * cols + cols * cols)
    size = max(1, GPTQ_BATCH_BYTES // per_problem)
    return [range(start, min(start + size, sources)) for start in range(0, sources, size)]


def rows_of(q: QuantizedTensor, r0: int, r1: int) -> QuantizedTensor:
    """Rows r0:r1 of a quantized matrix (every grid parameter is per row)."""
    def cut(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[r0:r1].clone()
    return QuantizedTensor(q.spec, cut(q.codes), cut(q.scales), cut(q.zeros), cut(q.lo_hi))


def _record(result: LayerResult, module: nn.Module, name: str, q: QuantizedTensor, method: str, error: float | None,
            tokens: int) -> None:
    _set_weight(module, dequantize(q))  # later sublayers and layers see the quantized weights
    result.quantized[name] = q
    result.tensors[name] = {"method": method, "error": error, "tokens": tokens}


def rtn_layer(weights: dict[str, Tensor], recipe: QuantRecipe) -> LayerResult:
    """Round-to-nearest of every matrix given (name -> fp32 [out, in]); no calibration, no Hessian."""
    result = LayerResult()
    for name, w in weights.items():
        result.quantized[name] = quantize_rtn(w, recipe.spec, recipe.clip)
        result.tensors[name] = {"method": "rtn", "error": None, "tokens": 0}
    return result
