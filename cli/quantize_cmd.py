"""`moeconv quantize SRC OUT`: GPTQ / round-to-nearest of a dense or MoE checkpoint's decoder-layer linears."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moeconv.cli.common import emit_json, guarded, key_value_table, layer_progress, setup_logging, stdout
from moeconv.config import load_quant_recipe
from moeconv.io.load import resolve_device
from moeconv.quantize import QuantizePlan, quantize


def _plan_table(plan: QuantizePlan) -> Table:
    bits = "data-dependent (< ternary's 2 + 32/in)" if plan.bits_per_weight_estimate is None else f"{plan.bits_per_weight_estimate:.3f}"
    group = "per row" if plan.group_size == -1 else str(plan.group_size)
    names = list(plan.modules)
    rows = [
        ("source", f"{plan.kind} {plan.family}, {plan.layers} layers"),
        ("format", f"{plan.format}, group {group}{', fp16 zero points' if plan.float_zeros else ''}, {plan.method}"),
        ("quantized linears", f"{len(names)} ({plan.quantized_weights / 1e6:.2f}M weights; first: {', '.join(names[:2])} ...)"),
        ("bits per weight", bits),
        ("output", f"{plan.output_bytes / 2**20:.1f} MiB in {len(plan.shards)} shard(s), others in {plan.dtype}"),
        ("calibration", f"{plan.calibration_tokens} tokens"),
        ("expected peak memory", f"{plan.peak_bytes_estimate / 2**30:.2f} GiB"),
    ]
    return key_value_table(f"plan: {plan.source}", rows)


@guarded
def quantize_command(
    src: Annotated[str, typer.Argument(help="dense model (folder, .gguf) or moeconv MoE checkpoint")],
    out: Annotated[Path, typer.Argument(help="output folder (written to OUT.partial/ first)")],
    bits: Annotated[str | None, typer.Option(help="8, 4, 3, 2, ternary or sub1")] = None,
    group_size: Annotated[int | None, typer.Option(help="input features per scale; -1 = per row")] = None,
    method: Annotated[str | None, typer.Option(help="gptq or rtn")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe, e.g. configs/gptq-int4.yaml")] = None,
    calib: Annotated[str | None, typer.Option(help="calibration text: built-in corpus, file or folder")] = None,
    calib_tokens: Annotated[int | None, typer.Option(help="calibration tokens")] = None,
    seqlen: Annotated[int | None, typer.Option(help="calibration window length")] = None,
    damp: Annotated[float | None, typer.Option(help="GPTQ damping, fraction of mean diag(H)")] = None,
    act_order: Annotated[bool | None, typer.Option("--act-order/--no-act-order", help="GPTQ columns by decreasing diag(H)")] = None,
    symmetric: Annotated[bool | None, typer.Option("--symmetric/--asymmetric", help="intN grid without zero points")] = None,
    float_zeros: Annotated[bool | None, typer.Option("--float-zeros/--int-zeros", help="intN: fp16 zero points on each group's exact range (GGUF Q4_1 layout at group 32)")] = None,
    dtype: Annotated[str | None, typer.Option(help="dtype of the tensors kept in high precision")] = None,
    max_shard_size: Annotated[str | None, typer.Option(help="e.g. 1GB, 200MB")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    force: Annotated[bool, typer.Option(help="replace an existing OUT")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run")] = False,
    dry_run: Annotated[bool, typer.Option(help="print the plan, write nothing")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable result on stdout")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True)] = 0,
) -> None:
    """Quantize a checkpoint's decoder-layer linears (experts included); routers, norms, embeddings stay as they are."""
    setup_logging(verbose, quiet)
    overrides = {
        "bits": bits, "group_size": group_size, "method": method, "calibration.source": calib,
        "calibration.tokens": calib_tokens, "calibration.seqlen": seqlen, "damp": damp, "act_order": act_order,
        "symmetric": symmetric, "float_zeros": float_zeros, "dtype": dtype, "max_shard_size": max_shard_size,
    }
    resolved = load_quant_recipe(recipe, overrides)
    with layer_progress(enabled=not (quiet or json_out or dry_run)) as progress:
        result = quantize(src, out, resolved, force=force, resume=resume, dry_run=dry_run,
                          device=resolve_device(device), progress=progress)
    if isinstance(result, QuantizePlan):
        emit_json({**asdict(result), "output_bytes": result.output_bytes}) if json_out else stdout.print(_plan_table(result))
        return
    if json_out:
        emit_json({"out": str(out), "bits": result["bits"], "quantization": result["quantization"]})
    elif not quiet:
        b = result["bits"]
        line = f"wrote {out}: {result['quantization']['modules']} linears at {b['quantized_linears']['bits_per_weight']:.3f} bits/weight"
        if "experts" in b:
            line += f" (experts {b['experts']['bits_per_weight']:.3f})"
        stdout.print(line + f"; whole model {b['whole_model']['bits_per_parameter']:.2f} bits/parameter")
