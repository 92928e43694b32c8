"""`moeconv dag SRC OUT`: add a DAG-MoE aggregator to an existing MoE checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moeconv.cli.common import emit_json, guarded, layer_progress, setup_logging, stdout
from moeconv.config import CalibrationSpec
from moeconv.dag.add import add_dag
from moeconv.errors import MoeconvError
from moeconv.io.load import resolve_device
from moeconv.jobs import ProgressEvent

OBJECTIVES = ("layer", "kl", "layer+kl")


@guarded
def dag_command(
    src: Annotated[Path, typer.Argument(help="a moeconv MoE checkpoint")],
    out: Annotated[Path, typer.Argument(help="output folder")],
    d_g: Annotated[int, typer.Option(help="message width d_g")] = 24,
    rounds: Annotated[int, typer.Option(help="message-passing rounds L")] = 2,
    objective: Annotated[str, typer.Option(help="layer: fit each layer's dense FFN output; kl: train all aggregators "
                                                "together on KL to the dense teacher's logits; layer+kl: both, in that order")] = "layer",
    steps: Annotated[int, typer.Option(help="layer-local distillation steps per layer")] = 300,
    epochs: Annotated[int, typer.Option(help="passes over the calibration windows of the end-to-end (kl) step")] = 3,
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
    """Add a DAG-MoE aggregator to every MoE layer, distilled to the dense model (per layer, or end to end with --objective kl)."""

    setup_logging(verbose, quiet)
    if objective not in OBJECTIVES:
        raise MoeconvError(f"unknown --objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    calibration = CalibrationSpec(source=calib, tokens=calib_tokens, seqlen=seqlen)
    dag = {"d_g": d_g, "rounds": rounds, "train": {"steps": steps if "layer" in objective else 0},
           "end_to_end": {"epochs": epochs} if "kl" in objective else None}
    with layer_progress(enabled=not (quiet or json_out)) as progress:
        result = add_dag(src, out, dag, calibration, seed=seed, force=force, resume=resume, device=resolve_device(device), teacher=teacher,
                          progress=lambda stage, layer, layers: progress(ProgressEvent(stage, layer, layers)))
    if json_out:
        emit_json({"out": str(out), **result})
    elif not quiet:
        layers, joint = result["layers"], result["end_to_end"]
        parts = []
        if layers:
            before = sum(m["rel_error_before"] for m in layers.values()) / len(layers)
            after = sum(m["rel_error_after"] for m in layers.values()) / len(layers)
            parts.append(f"mean layer error {before:.3f} -> {after:.3f} on held-out calibration tokens")
        if joint is not None:
            verdict = "kept" if joint["kept"] else "discarded: it did not lower the held-out KL"
            parts.append(f"end-to-end KL {joint['kl_before']:.4f} -> {joint['kl_trained']:.4f} on "
                         f"{joint['holdout_windows']} held-out calibration windows ({verdict})")
        stdout.print(f"wrote {out}: " + "; ".join(parts))
