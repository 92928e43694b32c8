"""`convert`: stream a dense checkpoint into a moeconv MoE checkpoint, one decoder layer at a time."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from moeconv.calib.capture import LayerRunner, tokenize_windows
from moeconv.calib.sources import load_text
from moeconv.config import ConvertRecipe, parse_size
from moeconv.dtypes import DTYPES, output_dtype
from moeconv.errors import CheckpointError, RecipeError
from moeconv.estimate import layer_flops, layer_memory, measured_flop_rate, weight_sizes
from moeconv.heal import HealEvent, heal, write_like_student
from moeconv.heal.checkpoint import CHECKPOINT_DIR
from moeconv.heal.train import RUN_SPECIFIC
from moeconv.io.adapters import FamilyAdapter, adapter_for
from moeconv.io.layout import LayerLayout, moe_settings, output_config
from moeconv.io.load import load_model, load_tokenizer
from moeconv.io.readers import CheckpointReader, open_checkpoint
from moeconv.io.writer import PartialOutput, plan_shards, shard_name
from moeconv.jobs import (
    ProgressEvent,
    ProgressFn,
    available_memory,
    check_destination,
    check_disk,
    check_memory,
    fingerprint,
    provenance,
    release_freed_memory,
    run_job,
    write_checkpoint_files,
)
from moeconv.partition import get_partitioner
from moeconv.stages import LayerContext, build_block, layer_stages, run_layer_stages

log = logging.getLogger(__name__)


@dataclass
class ConvertPlan:
    """Everything decided before any compute: shown by --dry-run."""

    source: str
    family: str
    layers: int
    d_model: int
    d_ff: int
    experts: int
    top_k: int
    expert_size: int
    shared_size: int
    dtype: str
    shards: list[list[int]]
    unit_bytes: list[int]
    calibration_tokens: int
    heal_tokens: int
    stages: list[str]  # what runs on every layer, then on the whole model, in order
    total_params: int
    active_params: int
    peak_bytes_estimate: int
    tensors: list[str]
    memory_parts: dict[str, int]  # peak_bytes_estimate by part (moeconv.estimate.layer_memory)
    layer_flops: dict[str, float]  # matrix-product work per layer by stage
    scratch_bytes: int = 0  # resume files beside the shards (one layer's hidden states)
    flop_rate: float = 0.0  # measured by --dry-run on the conversion device
    seconds_per_layer_estimate: float = 0.0  # layer_flops / flop_rate (dry run only)

    @property
    def output_bytes(self) -> int:
        return sum(self.unit_bytes)


def validate(recipe: ConvertRecipe, adapter: FamilyAdapter, reader: CheckpointReader) -> tuple[int, int]:
    """(expert_size, shared_size) or a RecipeError naming the fix."""
    d_ff = adapter.d_ff(reader.config)
    routed = d_ff - recipe.shared_neurons
    if recipe.shared_neurons >= d_ff:
        raise RecipeError(f"shared_neurons={recipe.shared_neurons} leaves no routed neurons (FFN width {d_ff})")
    if routed % recipe.experts:
        valid = [e for e in range(2, min(routed, 256) + 1) if routed % e == 0]
        raise RecipeError(f"{recipe.experts} experts do not divide the {routed} routed FFN neurons; valid expert counts: {valid}")
    if not 1 <= recipe.top_k <= recipe.experts:
        raise RecipeError(f"top_k={recipe.top_k} must be between 1 and experts={recipe.experts}")
    get_partitioner(recipe.partition.method, recipe.partition.options)  # unknown method / options fail here
    return routed // recipe.experts, recipe.shared_neurons


def make_plan(src: str, reader: CheckpointReader, adapter: FamilyAdapter, recipe: ConvertRecipe) -> tuple[ConvertPlan, LayerLayout]:
    expert_size, shared_size = validate(recipe, adapter, reader)
    dtype = output_dtype(recipe.dtype, reader.config)
    layout = LayerLayout(reader, adapter, moe_settings(recipe, adapter, reader.config, expert_size, shared_size), DTYPES[dtype])
    unit_bytes = [layout.unit_bytes(u) for u in range(layout.num_units)]
    shards = plan_shards(unit_bytes, parse_size(recipe.max_shard_size))
    partitioner = get_partitioner(recipe.partition.method, recipe.partition.options)
    partition_reads = partitioner.needs_calibration
    calib = recipe.calibration.tokens if recipe.needs_calibration(partition_reads) else 0
    tokens = -(-calib // recipe.calibration.seqlen) * recipe.calibration.seqlen  # captured in whole windows
    d = layout.d_model
    d_ff = adapter.d_ff(reader.config)
    sizes = weight_sizes(reader, adapter.ffn_path.split(".{i}")[0])
    source_bytes = DTYPES[output_dtype("auto", reader.config)].itemsize  # the FFN as read (source dtype)
    streams = 2 if recipe.calibration.inputs == "converted" else 1  # hidden states carried (and saved for resume)
    parts = layer_memory(recipe, tokens, d, d_ff, sizes, (3 if adapter.gated else 2) * d * d_ff * source_bytes,
                         max(unit_bytes[1:], default=0), unit_bytes[0])
    flops = layer_flops(recipe, tokens, d, d_ff, sizes[2], recipe.calibration.seqlen, partitioner.work(tokens, d, d_ff))
    stages = [f"partition ({recipe.partition.method})" if name == "partition" else name
              for name, _ in layer_stages(recipe, calibrated=calib > 0)]
    if recipe.heal is not None:
        stages.append("heal")
    total, active = layout.parameter_counts()
    plan = ConvertPlan(
        source=src, family=reader.config.model_type, layers=layout.num_layers, d_model=d, d_ff=d_ff,
        experts=recipe.experts, top_k=recipe.top_k, expert_size=expert_size, shared_size=shared_size, dtype=dtype,
        shards=shards, unit_bytes=unit_bytes, calibration_tokens=calib,
        heal_tokens=recipe.heal.steps() * recipe.heal.batch * recipe.heal.seqlen if recipe.heal else 0, stages=stages, total_params=total, active_params=active,
        peak_bytes_estimate=sum(parts.values()), tensors=[n for u in range(layout.num_units) for n in layout.unit_names(u)],
        memory_parts=parts, layer_flops=flops, scratch_bytes=streams * tokens * d * 4,
    )
    return plan, layout


def _memory_fix(src, reader, adapter, recipe: ConvertRecipe, plan: ConvertPlan) -> str:
    """Which budget to lower: the calibration tokens that fit (halving), or that the weights alone do not fit."""
    free = available_memory() or 0
    tokens = plan.calibration_tokens
    while tokens > recipe.calibration.seqlen:
        tokens //= 2
        trial = recipe.model_copy(update={"calibration": recipe.calibration.model_copy(update={"tokens": tokens})})
        if make_plan(src, reader, adapter, trial)[0].peak_bytes_estimate <= free:
            return f"lower --calib-tokens to {tokens} or fewer, or free memory"
    return "even the smallest calibration does not fit: free memory or convert on a machine with more"


def convert(
    src: str,
    out: str | Path,
    recipe: ConvertRecipe,
    *,
    force: bool = False,
    resume: bool = False,
    dry_run: bool = False,
    device: torch.device = torch.device("cpu"),
    progress: ProgressFn = lambda e: None,
) -> ConvertPlan | dict:
    """Convert SRC into a MoE checkpoint at OUT.  Returns the plan (dry run) or the provenance."""
    out = Path(out)
    check_destination(src, out, force=True)  # OUT's own state is checked after the plan, which --dry-run prints regardless
    progress(ProgressEvent("reading source"))
    reader = open_checkpoint(src, validate=False)
    adapter = adapter_for(reader.config)  # an unsupported family is named as such, before its tensors are checked
    reader.validate()
    plan, layout = make_plan(src, reader, adapter, recipe)
    if dry_run:
        if plan.layer_flops:
            plan.flop_rate = measured_flop_rate(device)
            plan.seconds_per_layer_estimate = sum(plan.layer_flops.values()) / plan.flop_rate
        return plan
    check_destination(src, out, force)
    check_disk(out, plan.output_bytes + plan.scratch_bytes, resume)
    check_memory(plan.peak_bytes_estimate, f"{plan.calibration_tokens} calibration tokens: "
                 + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in plan.memory_parts.items()),
                 _memory_fix(src, reader, adapter, recipe, plan))

    windows, calib_fp = None, "none"
    if plan.calibration_tokens:
        progress(ProgressEvent("tokenizing calibration text"))
        text = load_text(recipe.calibration.source, recipe.calibration.text_field)
        tokenizer = load_tokenizer(reader.path, purpose="calibration")
        windows = tokenize_windows(tokenizer, text, recipe.calibration.tokens, recipe.calibration.seqlen)
        calib_fp = f"{text.fingerprint}:{windows.numel()}:{recipe.calibration.seqlen}"
    return run_job(out, fingerprint(reader, recipe, calib_fp),
                   lambda partial: _run(reader, adapter, recipe, plan, layout, partial, windows, calib_fp, device, progress),
                   force=force, resume=resume, progress=progress)


def _run(reader, adapter, recipe, plan, layout, partial, windows, calib_fp, device, progress) -> dict:
    names = [shard_name(s, len(plan.shards)) for s in range(len(plan.shards))]
    todo = [s for s, name in enumerate(names) if not partial.has_shard(name)]
    first_layer = min((u - 1 for s in todo for u in plan.shards[s] if u > 0), default=plan.layers)
    runner = None
    if windows is not None and todo:
        progress(ProgressEvent("embedding calibration windows"))
        converted = recipe.calibration.inputs == "converted"
        runner = LayerRunner(reader, adapter, windows, device=device, converted_stream=converted)
        resume_state = partial.path / f"hidden-{first_layer}.safetensors"
        if first_layer > 0 and resume_state.is_file():
            runner.restore(load_file(str(resume_state)))
        elif first_layer > 0 and converted:  # each shard saves the states before it counts as done: cannot happen
            raise CheckpointError(f"{partial.path} has layers up to {first_layer} but not the calibration states after "
                                  "them; start again with --force")
        else:
            for i in range(first_layer):  # states were not kept: recompute them
                progress(ProgressEvent("replaying dense layer", i, plan.layers))
                runner.run_layer(i, capture=False)
    metrics: dict[str, dict[str, float]] = dict(partial.state.get("layers", {}))
    partitioner = get_partitioner(recipe.partition.method, recipe.partition.options)
    for s in todo:
        entries = [e for unit in plan.shards[s] for e in layout.unit_entries(unit)]
        with partial.stream_shard(names[s], entries) as shard:  # each unit is written as soon as it exists
            for unit in plan.shards[s]:
                if unit == 0:
                    progress(ProgressEvent("writing embeddings and head"))
                    tensors = layout.global_tensors()
                else:
                    i = unit - 1
                    ctx = LayerContext(index=i, layers=plan.layers, ffn=adapter.read_ffn(reader.get, i, reader.config),
                                       recipe=recipe, moe=layout.moe,
                                       generator=torch.Generator().manual_seed(recipe.seed * 100003 + i), device=device)
                    if runner is not None:
                        progress(ProgressEvent("capture", i, plan.layers))
                        if runner.converted is None:
                            ctx.calib = runner.run_layer(i)
                        else:
                            ctx.calib, gap = runner.run_converted(i)
                            ctx.gap = gap if corrects_gap(recipe, adapter) else None
                            del gap
                    run_layer_stages(ctx, partitioner, lambda stage, i=i: progress(ProgressEvent(stage, i, plan.layers)))
                    metrics[str(i)] = ctx.metrics
                    release_freed_memory()  # the layer's freed heap pages (moeconv/jobs/malloc.py)
                    progress(ProgressEvent("done", i, plan.layers, ctx.metrics))
                    block = build_block(ctx, layout.d_model)
                    tensors = layout.layer_tensors(i, block)
                    if runner is not None and runner.converted is not None and i + 1 < plan.layers:
                        progress(ProgressEvent("advance converted", i, plan.layers))
                        runner.advance_converted(i, block)
                    del block, ctx
                planned = [name for name, _, _ in layout.unit_entries(unit)]
                if set(planned) != set(tensors):
                    raise RuntimeError(f"internal: unit {unit} tensors {sorted(set(tensors) ^ set(planned))} differ from the plan")
                for name in planned:
                    shard.write(name, tensors[name])
                del tensors
            partial.save_state("layers", metrics)  # before the shard counts as done: its layers' metrics resume with it
            last_layer = max(plan.shards[s]) - 1
            if runner is not None and last_layer + 1 < plan.layers:  # so are the states entering the next shard
                partial.save_tensors(f"hidden-{last_layer + 1}.safetensors", runner.state())
        for stale in partial.path.glob("hidden-*.safetensors"):
            if stale.name != f"hidden-{last_layer + 1}.safetensors":
                stale.unlink()
    for stale in partial.path.glob("hidden-*.safetensors"):
        stale.unlink(missing_ok=True)
    return _finish(reader, recipe, plan, layout, partial, names, metrics, calib_fp, device, progress)


def corrects_gap(recipe: ConvertRecipe, adapter: FamilyAdapter) -> bool:
    """Whether the refit aims at the dense layer's output (recipe refit.target: layer) in this family: only where the
    FFN output is added to the residual stream as is, so that the gap it must close is a plain difference."""
    return recipe.refits and recipe.refit.target == "layer" and adapter.ffn_output_added


def _finish(reader, recipe, plan, layout, partial, names, metrics, calib_fp, device, progress) -> dict:
    progress(ProgressEvent("writing config, code and tokenizer"))
    weight_map = {t: names[s] for s, units in enumerate(plan.shards) for u in units for t in layout.unit_names(u)}
    partial.write_index(weight_map, plan.output_bytes)
    tokenizer_saved = write_checkpoint_files(partial, output_config(reader.config, layout.moe, plan.dtype), recipe, reader)
    record = provenance(plan.source, reader, calib_fp, tokenizer_saved,
                        parameters={"total": plan.total_params, "active": plan.active_params},
                        layers={i: metrics[i] for i in sorted(metrics, key=int)})
    if recipe.heal is not None:  # OUT.partial is now a complete student: heal it in place, once
        if "heal" not in partial.state:
            partial.save_state("heal", _heal_partial(plan.source, partial, recipe, device, progress))
        shutil.rmtree(partial.path / CHECKPOINT_DIR, ignore_errors=True)  # only once the heal is recorded as done
        record["heal"] = partial.state["heal"]
    partial.write_json("provenance.json", record)
    return record


def _heal_partial(src: str, partial: PartialOutput, recipe: ConvertRecipe, device: torch.device, progress: ProgressFn) -> dict:
    """Distil the dense source into the MoE written at OUT.partial and rewrite its shards.  -> heal metrics

    Checkpoints live in OUT.partial/heal-state; heal saves one after its last step too, so a run killed
    while the healed shards are rewritten resumes from that state rather than from mixed shards.
    """

    device = str(device)
    progress(ProgressEvent("loading student and teacher for heal"))
    student = load_model(partial.path, "float32", device)
    teacher = load_model(src, "float32", device)
    tokenizer = load_tokenizer(src)

    def on_event(event: HealEvent) -> None:
        if event.stage == "step":
            progress(ProgressEvent(f"heal step {event.step}/{event.steps}, KL {event.metrics['kl']:.3f}"))

    metrics = heal(student, teacher, tokenizer, recipe.heal, partial.path / CHECKPOINT_DIR, on_event, device=device)
    progress(ProgressEvent("writing healed weights"))
    write_like_student(student, partial.path, partial)
    return {k: v for k, v in metrics.items() if k != "config" and k not in RUN_SPECIFIC}


__all__ = ["convert", "make_plan", "ConvertPlan"]
