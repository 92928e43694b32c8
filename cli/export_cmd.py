"""`moeconv export SRC OUT --to TARGET`: a moeconv checkpoint in a format serving stacks load without moeconv."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moeconv.cli.common import emit_json, guarded, key_value_table, setup_logging, stdout
from moeconv.export import ExportOptions, ExportPlan, available_targets, export


def _plan_table(plan: ExportPlan) -> Table:
    moe = (f"{plan.experts} x {plan.expert_size} neurons, top-{plan.top_k}, shared {plan.shared_size}"
           if plan.experts else "dense (no experts)")
    rows = [
        ("target", f"{plan.target}: {plan.architecture}"),
        ("source", f"{plan.family}, {plan.layers} layers"),
        ("experts", moe),
        ("routing", f"{plan.routing}: {plan.routing_detail}"),
        ("dtype", plan.dtype),
        ("output", f"{plan.output_bytes / 2**20:.1f} MiB, {len(plan.tensors)} tensors (first: {', '.join(plan.tensors[:3])} ...)"),
        *[("note", n) for n in plan.notes],
        ("cannot hold", "; ".join(plan.cannot_hold)),
    ]
    return key_value_table(f"export plan: {plan.source}", rows)


def _summary(result: dict) -> str:
    line = f"wrote {result['out']} ({result['architecture']}, routing {result['routing']})"
    m = result.get("measured") or {}
    if m:
        line += (f"; mapped routing on {m['check_tokens']} check tokens ({m['check_text']}): logits moved by "
                 f"{m['logits_rel_error']:.2e} relative (max per token {m['max_token_rel_error']:.2e}), selected expert "
                 f"weights within {m['max_weight_deviation']:.1e} of 1, top-k choice changed at "
                 f"{100 * m['topk_changed_fraction']:.3f}% of token-layers, next-token NLL {m['check_nll']:.4f} -> "
                 f"{m['check_nll_mapped']:.4f}")
    return line


@guarded
def export_command(
    src: Annotated[str, typer.Argument(help="a moeconv checkpoint (for --to gguf also a dense folder or .gguf)")],
    out: Annotated[Path, typer.Argument(help="output folder (written to OUT.partial/ first)")],
    to: Annotated[str, typer.Option("--to", help="target: " + "; ".join(f"{k}: {v}" for k, v in available_targets().items()))],
    tensor_type: Annotated[str | None, typer.Option("--type", help="gguf tensor type: F32, F16, BF16, Q8_0, ... (default: the source dtype)")] = None,
    route_epsilon: Annotated[float, typer.Option(help="weight-1 routing mapped onto softmax: allowed deviation of a selected expert's weight from 1")] = 1e-3,
    check_tokens: Annotated[int, typer.Option(help="tokens the mapped routing is measured on")] = 256,
    max_shard_size: Annotated[str, typer.Option(help="safetensors shard size, e.g. 2GB")] = "2GB",
    force: Annotated[bool, typer.Option(help="replace an existing OUT")] = False,
    dry_run: Annotated[bool, typer.Option(help="say what the target will hold and what it cannot; write nothing")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable result on stdout")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True)] = 0,
) -> None:
    """Export a MoE checkpoint to Qwen2-MoE, Mixtral (transformers, no remote code) or GGUF (llama.cpp)."""
    setup_logging(verbose, quiet)
    options = ExportOptions(tensor_type=tensor_type, route_epsilon=route_epsilon, check_tokens=check_tokens,
                            max_shard_size=max_shard_size)
    show = not (quiet or json_out or dry_run)

    def progress(stage: str) -> None:
        if show:
            stdout.print(f"[dim]{stage}[/]", highlight=False)

    result = export(src, out, to, options, force=force, dry_run=dry_run, progress=progress)
    if isinstance(result, ExportPlan):
        if json_out:
            emit_json({k: v for k, v in asdict(result).items() if k not in ("routing_map", "layout")})
        else:
            stdout.print(_plan_table(result))
        return
    if json_out:
        emit_json(result)
    elif not quiet:
        stdout.print(_summary(result), highlight=False)
