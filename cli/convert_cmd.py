"""`moeconv convert SRC OUT`: dense -> MoE."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moeconv.cli.common import emit_json, guarded, key_value_table, layer_progress, setup_logging, stdout
from moeconv.config import ConvertRecipe, load_recipe
from moeconv.convert import ConvertPlan, convert
from moeconv.io.load import resolve_device


def _plan_table(plan: ConvertPlan) -> Table:
    rows = [
        ("family", plan.family),
        ("layers", str(plan.layers)),
        ("FFN", f"{plan.d_model} -> {plan.d_ff}"),
        ("experts", f"{plan.experts} x {plan.expert_size} neurons, top-{plan.top_k}, shared {plan.shared_size}"),
        ("parameters", f"{plan.total_params / 1e6:.2f}M total, {plan.active_params / 1e6:.2f}M active per token"),
        ("output", f"{plan.output_bytes / 2**20:.1f} MiB in {len(plan.shards)} shard(s), {plan.dtype}"),
        ("calibration", f"{plan.calibration_tokens} tokens"),
        ("stages", " -> ".join(plan.stages)),
        ("heal", f"{plan.heal_tokens} tokens, end to end" if plan.heal_tokens else "none"),
        ("expected peak memory", f"{plan.peak_bytes_estimate / 2**30:.2f} GiB: "
                                 + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in plan.memory_parts.items())),
        ("time per layer", _time_row(plan)),
        ("tensors", f"{len(plan.tensors)} (first: {', '.join(plan.tensors[:3])} ...)"),
    ]
    return key_value_table(f"plan: {plan.source}", rows)


def _time_row(plan: ConvertPlan) -> str:
    if not plan.layer_flops:
        return "no calibration: dominated by reading and writing"
    stages = ", ".join(f"{k} {v / plan.flop_rate:.0f} s" for k, v in plan.layer_flops.items())
    return (f"~{plan.seconds_per_layer_estimate:.0f} s estimated ({stages}; ~{plan.seconds_per_layer_estimate * plan.layers / 3600:.1f} h "
            f"for {plan.layers} layers) from {sum(plan.layer_flops.values()) / 1e12:.1f} TFLOP at a measured "
            f"{plan.flop_rate / 1e9:.0f} GFLOP/s")


@guarded
def convert_command(
    src: Annotated[str, typer.Argument(help="dense model: a folder, a .gguf file, or a Hub id when online")],
    out: Annotated[Path, typer.Argument(help="output folder (written to OUT.partial/ first)")],
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe (default: the fields of configs/dot-moe.yaml)")] = None,
    experts: Annotated[int | None, typer.Option(help="number of experts E")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="experts per token k")] = None,
    method: Annotated[str | None, typer.Option(help="partitioner: dot (default), coact, kmeans, random, cmoe, expertweaver (any registered)")] = None,
    shared_neurons: Annotated[int | None, typer.Option(help="always-active neurons")] = None,
    scoring: Annotated[str | None, typer.Option(help="router scoring: none, softmax, sigmoid")] = None,
    calib: Annotated[str | None, typer.Option(help="calibration text: built-in corpus, file or folder")] = None,
    calib_tokens: Annotated[int | None, typer.Option(help="calibration tokens")] = None,
    seqlen: Annotated[int | None, typer.Option(help="calibration window length")] = None,
    calib_inputs: Annotated[str | None, typer.Option(help="calibrate each layer on the dense model's hidden states "
                                                     "(dense) or on those of the layers converted before it (converted)")] = None,
    refit: Annotated[bool | None, typer.Option("--refit/--no-refit", help="least-squares refit of each down projection under its routing (default: the recipe's, on)")] = None,
    dag: Annotated[bool, typer.Option("--dag", help="add a DAG-MoE aggregator (recipe defaults), distilled per layer")] = False,
    heal_tokens: Annotated[int | None, typer.Option(help="heal the MoE end to end on N tokens after partitioning")] = None,
    heal_source: Annotated[str | None, typer.Option(help="heal text (default: the calibration text)")] = None,
    no_router_training: Annotated[bool, typer.Option(help="keep an untrained router (only for top_k == experts)")] = False,
    dtype: Annotated[str | None, typer.Option(help="output dtype: auto, float32, bfloat16, float16")] = None,
    max_shard_size: Annotated[str | None, typer.Option(help="e.g. 1GB, 200MB")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    force: Annotated[bool, typer.Option(help="replace an existing OUT")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run")] = False,
    dry_run: Annotated[bool, typer.Option(help="print the plan, write nothing")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable result on stdout")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True)] = 0,
) -> None:
    """Convert a dense causal LM into a Mixture-of-Experts checkpoint."""
    setup_logging(verbose, quiet)
    overrides = {
        "experts": experts, "top_k": top_k, "partition.method": method, "shared_neurons": shared_neurons,
        "scoring": scoring, "calibration.source": calib, "calibration.tokens": calib_tokens,
        "calibration.seqlen": seqlen, "calibration.inputs": calib_inputs, "dtype": dtype, "max_shard_size": max_shard_size, "seed": seed,
        "train_router": False if no_router_training else None,
    }
    if dag:
        overrides["dag"] = {}
    if heal_tokens is not None or heal_source is not None:
        overrides.update({"heal.tokens": heal_tokens, "heal.source": heal_source or calib})
    resolved = load_recipe(recipe, overrides)
    if refit is not None and (resolved.refit is not None) != refit:  # the flag wins over the recipe; validated again
        resolved = ConvertRecipe.model_validate({**resolved.model_dump(mode="json"), "refit": refit})
    with layer_progress(enabled=not (quiet or json_out or dry_run)) as progress:
        result = convert(src, out, resolved, force=force, resume=resume, dry_run=dry_run,
                         device=resolve_device(device), progress=progress)
    if isinstance(result, ConvertPlan):
        emit_json(asdict(result)) if json_out else stdout.print(_plan_table(result))
        return
    if json_out:
        emit_json({"out": str(out), **result})
    elif not quiet:
        p = result["parameters"]
        stdout.print(f"wrote {out}: {p['total'] / 1e6:.2f}M parameters, {p['active'] / 1e6:.2f}M active per token")
