"""`quantize`: stream a dense or moeconv checkpoint into a quantized moeconv checkpoint, one decoder layer at a time."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import moeconv.io.load  # noqa: F401 - registers the moeconv config/model classes with transformers' Auto*
from moeconv.calib.capture import LayerRunner, tokenize_windows
from moeconv.calib.sources import load_text
from moeconv.config import QuantRecipe, QuantSpec
from moeconv.dtypes import DTYPES, itemsize_of_code
from moeconv.errors import CheckpointError
from moeconv.io.layout import output_config
from moeconv.io.load import load_tokenizer
from moeconv.io.readers import open_checkpoint
from moeconv.io.writer import PartialOutput, shard_name
from moeconv.jobs import (
    ProgressEvent,
    ProgressFn,
    check_destination,
    check_disk,
    check_memory,
    fingerprint,
    provenance,
    release_freed_memory,
    run_job,
    write_checkpoint_files,
)
from moeconv.modeling.hf.quant_linear import LAYOUT_VERSION, SUB1_BLOCK_ROWS, SUB1_PAIR_COUNTS_KEY, buffer_specs
from moeconv.quant import sub1
from moeconv.quant.grids import QuantizedTensor
from moeconv.quant.packing import pack, stored_bits_of_format, unpack
from moeconv.quant.pipeline import (
    LayerResult,
    per_expert_modules,
    quantizable,
    quantize_layer,
    rtn_layer,
    weight_of,
)
from moeconv.quant.plan import QuantizePlan, make_plan, unit_entries

log = logging.getLogger(__name__)


def quantize(
    src: str,
    out: str | Path,
    recipe: QuantRecipe,
    *,
    force: bool = False,
    resume: bool = False,
    dry_run: bool = False,
    device: torch.device = torch.device("cpu"),
    progress: ProgressFn = lambda e: None,
) -> QuantizePlan | dict:
    """Quantize SRC's decoder-layer linears into a moeconv checkpoint at OUT.  Returns the plan (dry run) or the provenance."""
    out = Path(out)
    check_destination(src, out, force=True)  # OUT's own state is checked after the plan, which --dry-run prints regardless
    progress(ProgressEvent("reading source"))
    reader = open_checkpoint(src)
    plan, ctx = make_plan(src, reader, recipe)
    if dry_run:
        return plan
    check_destination(src, out, force)
    scratch = plan.calibration_tokens * int(reader.config.hidden_size) * 4  # the hidden states kept for --resume
    check_disk(out, plan.output_bytes + scratch, resume)
    if plan.calibration_tokens:
        check_memory(plan.peak_bytes_estimate, f"{plan.calibration_tokens} calibration tokens, the float32 embeddings and a layer",
                     "lower --calib-tokens, or free memory")
    else:
        check_memory(plan.peak_bytes_estimate, "a layer in float32", "free memory")
    windows, calib_fp = None, "none"
    if recipe.needs_calibration:
        progress(ProgressEvent("tokenizing calibration text"))
        text = load_text(recipe.calibration.source, recipe.calibration.text_field)
        try:
            tokenizer = load_tokenizer(reader.path)
        except CheckpointError as err:
            raise CheckpointError(f"GPTQ's calibration needs a tokenizer ({err}); add one to {src} or use --method rtn") from None
        windows = tokenize_windows(tokenizer, text, recipe.calibration.tokens, recipe.calibration.seqlen)
        calib_fp = f"{text.fingerprint}:{windows.numel()}:{recipe.calibration.seqlen}"
    return run_job(out, fingerprint(reader, recipe, calib_fp),
                   lambda partial: _run(reader, recipe, plan, ctx, partial, windows, calib_fp, device, progress),
                   force=force, resume=resume, progress=progress)


def _run(reader, recipe: QuantRecipe, plan: QuantizePlan, ctx: dict, partial: PartialOutput, windows, calib_fp, device, progress) -> dict:
    names = [shard_name(s, len(plan.shards)) for s in range(len(plan.shards))]
    todo = [s for s, name in enumerate(names) if not partial.has_shard(name)]
    first_layer = min((u - 1 for s in todo for u in plan.shards[s] if u > 0), default=plan.layers)
    prefix, runner = ctx["prefix"], None
    if windows is not None and first_layer < plan.layers:
        progress(ProgressEvent("embedding calibration windows"))
        runner = LayerRunner(reader, None, windows, batch_size=recipe.batch_size, device=device, ffn_path=ctx["moe"]["ffn_path"])
        resume_state = partial.path / f"hidden-{first_layer}.safetensors"
        if first_layer > 0 and resume_state.is_file():
            runner.restore(load_file(str(resume_state)))
        elif first_layer > 0:
            raise CheckpointError(f"{partial.path} lacks the saved hidden states of layer {first_layer}; rerun without --resume")
    metrics: dict[str, dict] = json.loads(json.dumps(partial.state.get("layers", {})))  # a private copy: sub1 edits it
    dtype = DTYPES[plan.dtype]
    for s in todo:
        entries = [e for unit in plan.shards[s] for e in unit_entries(reader, plan, ctx, unit)]
        with partial.stream_shard(names[s], entries) as shard:  # each unit is written as soon as it exists
            for unit in plan.shards[s]:
                keys = sorted(k for k, u in ctx["unit_of"].items() if u == unit)
                if unit == 0:
                    progress(ProgressEvent("writing embeddings and head"))
                    for k in keys:  # one at a time: at 8B the embeddings and the head are 1 GiB each in bfloat16
                        shard.write(k, _float(reader.get(k), dtype))
                    continue
                i = unit - 1
                result = _quantize_layer(reader, recipe, plan, ctx, runner, i, progress)
                skip = {f"{prefix}.{i}.{rel}.weight" for rel in result.quantized}
                tensors = {k: _float(reader.get(k), dtype) for k in keys if k not in skip}
                metrics[str(i)] = _pack_layer(result, f"{prefix}.{i}.", recipe, tensors)
                del result
                for k in sorted(tensors):
                    shard.write(k, tensors[k])
                del tensors
                release_freed_memory()  # the layer's freed heap pages (moeconv/jobs/malloc.py)
                progress(ProgressEvent("done", i, plan.layers, {"mean_error": _mean_error(metrics[str(i)])}))
            last_layer = max(plan.shards[s]) - 1
            if runner is not None and last_layer + 1 < plan.layers:  # saved before the shard counts as done
                partial.save_tensors(f"hidden-{last_layer + 1}.safetensors", runner.state())
            partial.save_state("layers", metrics)  # before the shard counts as done: its layers' metrics resume with it
        for stale in partial.path.glob("hidden-*.safetensors"):
            if stale.name != f"hidden-{last_layer + 1}.safetensors":
                stale.unlink()
    for stale in partial.path.glob("hidden-*.safetensors"):
        stale.unlink()
    if recipe.bits == "sub1":
        _encode_sub1(partial, names, metrics, progress)
    return _finish(reader, recipe, plan, ctx, partial, names, metrics, calib_fp, progress)


def _float(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _quantize_layer(reader, recipe, plan, ctx, runner, i, progress) -> LayerResult:
    prefix = ctx["prefix"]
    if runner is None:  # round-to-nearest needs only the weights
        modules = quantizable(ctx["skeleton"].get_submodule(prefix)[i], f"{prefix}.{i}.", recipe.exclude)
        weights = {}
        for rel, m in modules.items():
            w = reader.get(f"{prefix}.{i}.{rel}.weight").float()
            weights[rel] = w if tuple(w.shape) == tuple(weight_of(m).shape) else w.t().contiguous()  # Conv1D: [in, out]
        progress(ProgressEvent("rtn", i, plan.layers))
        return rtn_layer(weights, recipe)
    progress(ProgressEvent("materialize", i, plan.layers))
    layer = runner.materialize(i)
    try:
        with per_expert_modules(layer):
            modules = quantizable(layer, f"{prefix}.{i}.", recipe.exclude)
            result = quantize_layer(runner, i, layer, modules, recipe, lambda stage: progress(ProgressEvent(stage, i, plan.layers)),
                                    ctx.setdefault("stage_cache", {}), update_hidden=True)
    finally:
        runner.release(i)
    return result


def _pack_layer(result: LayerResult, prefix: str, recipe: QuantRecipe, tensors: dict) -> dict:
    """Add the packed buffers of a layer to `tensors`; returns the layer's provenance entry.

    sub1 matrices are stored as ternary until every layer is done: the shared dictionary needs all of them."""
    entry: dict = {"tensors": {}, "expert_tokens": result.expert_tokens, "low_token_experts": sorted(result.sparse_experts)}
    counts = torch.zeros(9, dtype=torch.int64)
    for rel, q in result.quantized.items():
        name = prefix + rel
        if q.spec.bits == "sub1":
            counts += sub1.pair_counts(q.codes)
            q = QuantizedTensor(QuantSpec("ternary"), q.codes, scales=q.scales, lo_hi=q.lo_hi)  # same log8 lo/hi
        packed = pack(q)
        tensors.update({f"{name}.{b}": t for b, t in packed.buffers.items()})
        entry["tensors"][name] = {**result.tensors[rel], "format": {**packed.fmt, "method": recipe.method},
                                  "bits_per_weight": packed.bits_per_weight(), "weights": packed.num_weights}
        if recipe.bits == "sub1":
            entry["tensors"][name]["format"]["format"] = "sub1"  # final format; buffers re-encoded at the end
    if recipe.bits == "sub1":
        entry["pair_counts"] = counts.tolist()
    return entry


def _mean_error(entry: dict) -> float:
    errors = [t["error"] for t in entry["tensors"].values() if t["error"] is not None]
    return sum(errors) / len(errors) if errors else float("nan")


def _encode_sub1(partial: PartialOutput, names: list[str], metrics: dict, progress) -> None:
    """Build the one shared dictionary from every layer's pair counts and re-encode the ternary buffers with it.

    Only the counts are stored (`quant.sub1_pair_counts`): the loader rebuilds the same table from them."""
    progress(ProgressEvent("building the sub1 dictionary"))
    counts = sum(torch.tensor(m["pair_counts"]) for m in metrics.values())
    dictionary = sub1.build_dictionary(counts)
    fmts = {n: t for m in metrics.values() for n, t in m["tensors"].items()}
    for s, shard in enumerate(names):
        tensors = load_file(str(partial.path / shard))
        pending = [n for n in fmts if f"{n}.qweight" in tensors]
        if not pending and (s > 0 or SUB1_PAIR_COUNTS_KEY in tensors):
            continue  # already re-encoded by an interrupted run
        progress(ProgressEvent(f"sub1 encoding {shard}"))
        for name in pending:
            entry = fmts[name]
            ternary = {**entry["format"], "format": "ternary"}
            q = unpack({b: tensors.pop(f"{name}.{b}") for b in buffer_specs(ternary)}, ternary)
            packed = pack(QuantizedTensor(QuantSpec("sub1"), q.codes, scales=q.scales, lo_hi=q.lo_hi), dictionary,
                          shared_dictionary=True)
            packed.buffers.pop("dictionary")
            tensors.update({f"{name}.{b}": t for b, t in packed.buffers.items()})
            entry["format"] = {**packed.fmt, "method": entry["format"]["method"]}
            entry["bits_per_weight"] = packed.bits_per_weight()
        if s == 0:
            tensors[SUB1_PAIR_COUNTS_KEY] = counts.to(torch.int64)
        partial.write_shard(shard, tensors)
    for name, entry in fmts.items():  # formats of shards finished by an interrupted run
        if entry["format"].get("num_codes") is None:
            with safe_open(str(partial.path / _shard_of(partial, names, f"{name}.codes")), framework="pt") as h:
                codes = h.get_slice(f"{name}.codes").get_shape()[0]
            entry["format"].update(num_codes=codes, dictionary_size=dictionary.size, shared_dictionary=True,
                                   block_rows=SUB1_BLOCK_ROWS)
            entry["bits_per_weight"] = stored_bits_of_format(entry["format"]) / entry["weights"]


def _shard_of(partial: PartialOutput, names: list[str], key: str) -> str:
    for shard in names:
        with safe_open(str(partial.path / shard), framework="pt") as h:
            if key in h.keys():
                return shard
    raise CheckpointError(f"{partial.path} lost tensor {key}; rerun without --resume")


def bits_summary(metrics: dict, dictionary_bits: int) -> dict:
    """Bits per weight of all quantized linears and of the expert linears (the shared sub1 dictionary's stored bits,
    its 9 int64 pair counts, included in both)."""
    summary = {}
    for scope, keep in (("quantized_linears", lambda n: True), ("experts", lambda n: ".experts." in n)):
        entries = [t for m in metrics.values() for n, t in m["tensors"].items() if keep(n)]
        weights = sum(t["weights"] for t in entries)
        if weights:
            bits = sum(t["bits_per_weight"] * t["weights"] for t in entries) + dictionary_bits
            summary[scope] = {"bits_per_weight": bits / weights, "weights": weights}
    return summary


def _finish(reader, recipe, plan, ctx, partial, names, metrics, calib_fp, progress) -> dict:
    progress(ProgressEvent("writing config, code and tokenizer"))
    weight_map, bytes_of = {}, {}
    for shard in names:
        with safe_open(str(partial.path / shard), framework="pt") as h:
            for key in h.keys():
                sl = h.get_slice(key)
                weight_map[key] = shard
                bytes_of[key] = torch.Size(sl.get_shape()).numel() * itemsize_of_code(sl.get_dtype())
    total = sum(bytes_of.values())
    params = sum(torch.Size(reader.shape(k)).numel() for k in ctx["unit_of"])
    partial.write_index(weight_map, total)
    moe = dict(ctx["moe"])
    spec = recipe.spec
    moe["quant"] = {
        "method": recipe.method,
        "default": {"format": spec.format, "group_size": spec.group_size, "symmetric": spec.symmetric,
                    "float_zeros": spec.float_zeros},
        "modules": {n: t["format"] for m in metrics.values() for n, t in m["tensors"].items()},
        "sub1_dictionary": SUB1_PAIR_COUNTS_KEY if recipe.bits == "sub1" else None,  # the table's 9 pair counts
        "layout": LAYOUT_VERSION,  # a newer one refuses to load in older code (quant_linear.replace_with_quant_linear)
    }
    if plan.kind == "moe":
        config = json.loads((Path(reader.path) / "config.json").read_text())
        config["moe"], config["dtype"] = moe, plan.dtype
    else:
        config = output_config(reader.config, moe, plan.dtype)
    tokenizer_saved = write_checkpoint_files(partial, config, recipe, reader)
    dictionary_bits = bytes_of.get(SUB1_PAIR_COUNTS_KEY, 0) * 8  # 9 x 64 bits: the table is rebuilt at load
    record = provenance(
        plan.source, reader, calib_fp, tokenizer_saved,
        quantization={"format": spec.format, "group_size": spec.group_size, "method": recipe.method,
                      "modules": len(moe["quant"]["modules"]), "sub1_dictionary_bits": dictionary_bits},
        bits={**bits_summary(metrics, dictionary_bits),
              "whole_model": {"bits_per_parameter": 8 * total / max(params, 1), "parameters": params}},
        layers={i: metrics[i] for i in sorted(metrics, key=int)},
    )
    partial.write_json("provenance.json", record)
    return record

