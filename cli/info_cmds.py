"""`moeconv inspect` and `moeconv env`."""

from __future__ import annotations

import platform
from typing import Annotated

import torch
import typer
from rich.table import Table

from moeconv.cli.common import emit_json, guarded, setup_logging, stdout
from moeconv.inspect import inspect_checkpoint
from moeconv.jobs import versions


def _show(title: str, data: dict) -> None:
    table = Table(title=title, show_header=False)
    for k, v in data.items():
        if isinstance(v, int) and k in ("parameters", "active_parameters", "aggregator_parameters"):
            v = f"{v:,} ({v / 1e6:.2f}M)"
        elif k == "bytes_on_disk":
            v = f"{v / 2**20:.1f} MiB"
        table.add_row(k, str(v))
    stdout.print(table)


@guarded
def inspect_command(
    path: Annotated[str, typer.Argument(help="a dense or moeconv checkpoint (folder or .gguf)")],
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show what a checkpoint holds."""
    info = inspect_checkpoint(path)
    emit_json(info) if json_out else _show(path, info)


def env_info() -> dict:


    info = {**versions(), "python": platform.python_version(),
            "cuda": torch.cuda.is_available(), "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "cpu_threads": torch.get_num_threads()}
    try:
        from moeconv.kernels import kernel_status  # inside the try: a broken native build must not break `moeconv env`

        info["kernels"] = kernel_status()
    except ImportError as err:
        info["kernels"] = f"unavailable ({err})"
    return info


@guarded
def env_command(json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Versions, devices and which native kernels are built."""
    setup_logging(0, quiet=json_out)  # JSON on stdout stays clean of build warnings
    info = env_info()
    emit_json(info) if json_out else _show("moeconv env", info)
