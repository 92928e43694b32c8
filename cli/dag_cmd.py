"""`moeconv dag SRC OUT`: add a DAG-MoE aggregator to an existing MoE checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moeconv.cli.common import emit_json, guarded, layer_progress, setup_logging, stdout
from moeconv.convert import ProgressEvent
from moeconv.io.load import resolve_device
from moeconv.recipe import CalibrationSpec


@guarded
def dag_command(
    src: Annotated[Path, typer.Argument(help="a moeconv MoE checkpoint")],
    out: Annotated[Path, typer.Argument(help="output folder")],
    d_g: Annotated[int, typer.Option(help="message width d_g")] = 24,
    rounds: Annotated[int, typer.Option(help="message-passing rounds L")] = 2,
    steps: Annotated[int, typer.Option(help="distillation steps per layer")] = 300,
    calib: Annotated[str, typer.Option(help="calibration text")] = "shakespeare",
    calib_tokens: Annotated[int, typer.Option()] = 16384,
    seqlen: Annotated[int, typer.Option()] = 512,
    teacher: Annotated[str | None, typer.Option(help="the dense model SRC was converted from (default: the source in "
                                                   "provenance.json; needed for refitted checkpoints)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option()] = "auto",
    force: Annotated[bool, typer.Option(help="replace OUT, or an aggregator SRC already has")] = False,
    resume: Annotated[bool, typer.Option()] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True)] = 0,
) -> None:
    """Add a DAG-MoE aggregator to every MoE layer, distilled to the dense FFN output."""
    from moeconv.dag.add import add_dag

    setup_logging(verbose, quiet)
    calibration = CalibrationSpec(source=calib, tokens=calib_tokens, seqlen=seqlen)
    dag = {"d_g": d_g, "rounds": rounds, "train": {"steps": steps}}
    with layer_progress(enabled=not (quiet or json_out)) as progress:
        metrics = add_dag(src, out, dag, calibration, seed=seed, force=force, resume=resume, device=resolve_device(device), teacher=teacher,
                          progress=lambda stage, layer, layers: progress(ProgressEvent(stage, layer, layers)))
    if json_out:
        emit_json({"out": str(out), "layers": metrics})
    elif not quiet:
        before = sum(m["rel_error_before"] for m in metrics.values()) / len(metrics)
        after = sum(m["rel_error_after"] for m in metrics.values()) / len(metrics)
        stdout.print(f"wrote {out}: mean layer error {before:.3f} -> {after:.3f} on held-out calibration tokens")
