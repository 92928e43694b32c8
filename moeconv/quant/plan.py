"""The quantize plan: everything decided before any compute (shown by --dry-run), the planned peak memory, and the
tensors each output unit writes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM

import moeconv.io.load  # noqa: F401 - registers the moeconv config/model classes with transformers' Auto*
from moeconv.config import QuantRecipe, QuantSpec, parse_size
from moeconv.dtypes import DTYPES, output_dtype
from moeconv.errors import CheckpointError, RecipeError
from moeconv.estimate import BASE_BYTES, LOAD_TRANSIENT, weight_sizes
from moeconv.io.adapters import adapter_for
from moeconv.io.readers import CheckpointReader
from moeconv.io.writer import plan_shards
from moeconv.modeling.hf.quant_linear import buffer_specs
from moeconv.quant.packing import format_dict
from moeconv.quant.pipeline import GPTQ_BATCH_BYTES, quantizable, weight_of


@dataclass
class QuantizePlan:
    """Everything decided before any compute: shown by --dry-run."""

    source: str
    kind: str  # "dense" or "moe"
    family: str
    layers: int
    format: str
    group_size: int
    float_zeros: bool
    method: str
    dtype: str
    calibration_tokens: int
    modules: dict[str, list[int]]  # quantized module -> [out, in]
    quantized_weights: int
    bits_per_weight_estimate: float | None  # exact for intN/ternary; sub1 depends on the data
    unit_bytes: list[int]
    shards: list[list[int]]
    peak_bytes_estimate: int

    @property
    def output_bytes(self) -> int:
        return sum(self.unit_bytes)


def _source(reader: CheckpointReader, src: str) -> tuple[str, dict, object]:
    """(kind, moe block for the output, adapter or None); refuses checkpoints that are already quantized."""
    cfg = reader.config
    if cfg.model_type == "moeconv":
        moe = dict(cfg.moe)
        if moe.get("quant"):
            fmts = {f.get("format") for f in (moe["quant"].get("modules") or moe["quant"]).values() if isinstance(f, dict)}
            raise CheckpointError(f"{src} is already quantized ({', '.join(sorted(map(str, fmts)))}); quantize its unquantized source instead")
        return "moe", moe, None
    if getattr(cfg, "quantization_config", None):
        raise CheckpointError(f"{src} is already quantized ({cfg.quantization_config.get('quant_method', 'unknown method')}); "
                              "quantize an unquantized checkpoint instead")
    adapter = adapter_for(cfg)
    moe = {"ffn_path": adapter.ffn_path, "layers": [], "num_experts": 0, "top_k": 0, "expert_size": 0, "shared_size": 0,
           "quant": None}
    return "dense", moe, adapter


def _skeleton(reader: CheckpointReader) -> torch.nn.Module:
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(reader.config, attn_implementation="eager", dtype=torch.float32)


def _check_group_size(spec: QuantSpec, modules: dict[str, list[int]]) -> None:
    if spec.is_ternary or spec.group_size == -1:
        return
    bad = next((name for name, (_, cols) in modules.items() if cols % spec.group_size), None)
    if bad is not None:
        common = math.gcd(*(cols for _, cols in modules.values()))
        ok = [g for g in range(8, common + 1) if common % g == 0]
        raise RecipeError(f"group size {spec.group_size} does not divide the {modules[bad][1]} input features of {bad}; "
                          f"use one of {', '.join(map(str, ok))} or -1 (one group per row)")


def make_plan(src: str, reader: CheckpointReader, recipe: QuantRecipe) -> tuple[QuantizePlan, dict]:
    kind, moe, _ = _source(reader, src)
    prefix = moe["ffn_path"].split(".{i}")[0]
    layers = reader.config.num_hidden_layers
    skeleton = _skeleton(reader)
    stack = skeleton.get_submodule(prefix)
    modules: dict[str, list[int]] = {}
    for i in range(layers):
        for rel, m in quantizable(stack[i], f"{prefix}.{i}.", recipe.exclude).items():
            modules[f"{prefix}.{i}.{rel}"] = list(weight_of(m).shape)
    if not modules:
        raise RecipeError(f"nothing to quantize in {src}: every linear is excluded; check the recipe's `exclude` patterns")
    spec = recipe.spec
    _check_group_size(spec, modules)
    dtype = output_dtype(recipe.dtype, reader.config)
    tied = getattr(reader.config, "tie_word_embeddings", False)
    unit_of = {}
    for k in reader.keys():
        if tied and k == "lm_head.weight":
            continue
        unit_of[k] = int(k[len(prefix) + 1 :].split(".")[0]) + 1 if k.startswith(prefix + ".") else 0
    unit_bytes = [0] * (layers + 1)
    weights = {f"{m}.weight" for m in modules}
    for k, unit in unit_of.items():
        if k not in weights:
            shape = torch.Size(reader.shape(k))
            unit_bytes[unit] += shape.numel() * DTYPES[dtype].itemsize
    # sub1 is written as ternary until every layer is done (quantize._pack_layer), and ends smaller than that
    written_spec = QuantSpec("ternary") if spec.bits == "sub1" else spec
    stored_bits = 0
    for name, (rows, cols) in modules.items():
        fmt = format_dict(written_spec, rows, cols)
        bits = sum(torch.Size(s).numel() * d.itemsize * 8 for s, d in buffer_specs(fmt).values())
        unit_bytes[int(name[len(prefix) + 1 :].split(".")[0]) + 1] += bits // 8
        stored_bits += bits
    n_weights = sum(r * c for r, c in modules.values())
    calib = recipe.calibration.tokens if recipe.needs_calibration else 0
    peak = _peak_bytes(reader, prefix, calib, recipe.method == "gptq")
    plan = QuantizePlan(
        source=src, kind=kind, family=reader.config.model_type if kind == "dense" else reader.config.base_config["model_type"],
        layers=layers, format=spec.format, group_size=spec.group_size, float_zeros=spec.float_zeros, method=recipe.method, dtype=dtype,
        calibration_tokens=calib, modules=modules, quantized_weights=n_weights,
        bits_per_weight_estimate=None if spec.bits == "sub1" else stored_bits / n_weights, unit_bytes=unit_bytes,
        shards=plan_shards(unit_bytes, parse_size(recipe.max_shard_size)), peak_bytes_estimate=peak,
    )
    return plan, {"moe": moe, "prefix": prefix, "unit_of": unit_of, "skeleton": skeleton, "written_spec": written_spec}


def _peak_bytes(reader: CheckpointReader, prefix: str, calib: int, gptq: bool) -> int:
    """Planned peak: the process and the calibration states (the stream, a layer's outputs, the copy saved for --resume)
    plus the largest of what runs one after another: embedding the windows (the base model's non-layer weights in
    float32 and the load of the largest), quantizing a layer (its weights in float32 and their dequantized
    replacements, one GPTQ call's working set). Measured at 8B width (int4, 4096 tokens, bf16 source): 3.34 GiB
    embedding the windows (planned 5.47: LOAD_TRANSIENT was fitted to an older loader; a bf16 load costs ~0.5x, not
    1.5x, its float32 size), at most 3.1-4.05 GiB in a layer (planned 3.2)."""
    outside, largest, layer = weight_sizes(reader, prefix)
    steps = [layer * 4 * 2 + (GPTQ_BATCH_BYTES if gptq else 0)]
    if calib:
        steps.append(outside * 4 + LOAD_TRANSIENT * largest * 4)
    states = 3 * calib * int(reader.config.hidden_size) * 4
    return int(BASE_BYTES + states + max(steps))


def unit_entries(reader: CheckpointReader, plan: QuantizePlan, ctx: dict, unit: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor unit `unit` writes, in write order (by name): the kept tensors in the
    output dtype, and the packed buffers of each quantized linear (sub1 is written as ternary first, see _pack_layer)."""
    dtype = DTYPES[plan.dtype]
    weights = {f"{m}.weight" for m in plan.modules}
    entries = []
    for k, u in ctx["unit_of"].items():
        if u == unit and k not in weights:
            source = reader.dtype(k)
            entries.append((k, tuple(reader.shape(k)), dtype if source.is_floating_point else source))
    layer = f"{ctx['prefix']}.{unit - 1}."
    spec = ctx["written_spec"]
    for name, (rows, cols) in plan.modules.items():
        if unit > 0 and name.startswith(layer):
            entries += [(f"{name}.{b}", shape, d) for b, (shape, d) in buffer_specs(format_dict(spec, rows, cols)).items()]
    return sorted(entries)
