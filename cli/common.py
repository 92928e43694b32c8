"""Shared CLI plumbing: one-line errors, logging verbosity, progress bars with peak memory, JSON output."""

from __future__ import annotations

import errno
import functools
import logging
import resource
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import transformers
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from moeconv.errors import MoeconvError
from moeconv.io.files import strict_json, write_error

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

        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that partial files are cleaned up as for Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated


# A failed write the user can fix (disk, permissions, read-only mount) is one line, wherever it happens.
_USER_FIXABLE_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT}


def guarded(fn: Callable) -> Callable:
    """User mistakes become one line on stderr and exit code 2; never a traceback.  SIGINT exits 130, SIGTERM 143,
    both keeping OUT.partial for --resume."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
        try:
            return fn(*args, **kwargs)
        except MoeconvError as err:
            _error_line(str(err))
            raise typer.Exit(2) from None
        except OSError as err:
            if err.errno not in _USER_FIXABLE_ERRNOS:
                raise
            _error_line(str(write_error(Path(err.filename or "."), err)))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: rerun the same command with --resume to continue")
            raise typer.Exit(130) from None
        except Terminated:
            console.print("[yellow]terminated[/] (SIGTERM): rerun the same command with --resume to continue")
            raise typer.Exit(143) from None
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _error_line(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


# Per-layer metrics shown when a layer is done: FFN output error vs dense with the trained router (held-out
# calibration rows), the refit's error before -> after on its own held-out windows, router recall vs the oracle,
# load balance.
LAYER_METRICS = (("rel_error", "err"), ("refit_error_before", "refit"), ("refit_error_after", "->"),
                 ("router_recall", "recall"), ("load_max_over_mean", "load max/mean"))


def _label(event) -> str:
    label = event.stage if event.layer is None else f"(layer {event.layer + 1}/{event.layers}) {event.stage}"
    if event.stage == "done" and event.metrics:
        label += "".join(f", {short} {event.metrics[key]:.3f}" for key, short in LAYER_METRICS if key in event.metrics)
    return label


def live_progress() -> bool:
    """Bars are redrawn in place only on a terminal; a log file gets plain lines instead of frames."""
    return console.is_terminal


@contextmanager
def layer_progress(enabled: bool):
    """A progress callback rendering `(layer i/N) stage` and peak memory (plain lines for finished layers off a terminal)."""
    if not enabled:
        yield lambda event: None
        return
    if not live_progress():
        def line(event) -> None:
            if event.layer is None or event.stage == "done":
                console.print(f"{_label(event)} (peak {peak_rss_gib():.2f} GiB)", highlight=False, soft_wrap=True)

        yield line
        return
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TextColumn("peak {task.fields[peak]:.2f} GiB")]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("starting", total=None, peak=peak_rss_gib())

        def update(event) -> None:
            fields = {"description": _label(event), "peak": peak_rss_gib()}
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
    sys.stdout.write(strict_json(data, sort_keys=False) + "\n")
