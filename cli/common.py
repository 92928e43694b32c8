"""Shared CLI plumbing: one-line errors, logging verbosity, progress bars with peak memory, JSON output."""

from __future__ import annotations

import functools
import json
import logging
import resource
import sys
from collections.abc import Callable
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from moeconv.errors import MoeconvError

console = Console(stderr=True)
stdout = Console()


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)], force=True)
    for noisy in ("transformers", "accelerate", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.ERROR))
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass


def guarded(fn: Callable) -> Callable:
    """User mistakes become one line on stderr and exit code 2; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MoeconvError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: rerun the same command with --resume to continue")
            raise typer.Exit(130) from None

    return wrapper


# Per-layer metrics shown when a layer is done: FFN output error vs dense with the trained router (held-out
# calibration rows), the refit's error before -> after on its own held-out windows, router recall vs the oracle,
# load balance.
LAYER_METRICS = (("rel_error", "err"), ("refit_error_before", "refit"), ("refit_error_after", "->"),
                 ("router_recall", "recall"), ("load_max_over_mean", "load max/mean"))


@contextmanager
def layer_progress(enabled: bool):
    """A progress callback rendering `(layer i/N) stage` and peak memory."""
    if not enabled:
        yield lambda event: None
        return
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TextColumn("peak {task.fields[peak]:.2f} GiB")]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("starting", total=None, peak=peak_rss_gib())

        def update(event) -> None:
            label = event.stage if event.layer is None else f"(layer {event.layer + 1}/{event.layers}) {event.stage}"
            if event.stage == "done" and event.metrics:
                label += "".join(f", {short} {event.metrics[key]:.3f}" for key, short in LAYER_METRICS if key in event.metrics)
            fields = {"description": label, "peak": peak_rss_gib()}
            if event.layers:
                fields["total"] = event.layers
            if event.stage == "done" and event.layer is not None:
                fields["completed"] = event.layer + 1
            bar.update(task, **fields)

        yield update


def key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """A two-column table, as --dry-run plans and inspect show them."""
    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    return table


def emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
