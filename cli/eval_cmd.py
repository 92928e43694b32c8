"""`moeconv eval MODEL`: perplexity, parameters, size, speed and routing, optionally side by side with other models."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from moeconv.cli.common import console, emit_json, guarded, live_progress, setup_logging, stdout
from moeconv.eval.compare import compare, is_results_file, load_results, results_document, save_document
from moeconv.eval.perplexity import DEFAULT_DATA, EvalResult, EvalSettings, evaluate_model
from moeconv.eval.report import human, percent, ratio, short_name, write_report


@contextmanager
def _stage_progress(enabled: bool):
    """A progress callback (stage, done, total) rendering one bar per stage and model (none off a terminal)."""
    if not (enabled and live_progress()):
        yield lambda label: (lambda stage, done, total: None)
        return
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def for_model(label: str):
            def update(stage: str, done: int, total: int) -> None:
                key = f"{stage} {label}"
                if key not in tasks:
                    tasks[key] = bar.add_task(key, total=total)
                bar.update(tasks[key], completed=done, total=total)

            return update

        yield for_model


def _results_table(results: list[EvalResult]) -> Table:
    base = results[0]
    table = Table(title=f"perplexity on {short_name(base.data)} (seqlen {base.seqlen}, stride {base.stride}, {base.dtype}, {base.device})")
    for column in ("model", "ppl", "vs first", "top-1", "kept", "params", "active", "embedding", "on disk", "tokens/s", "windows",
                   "flags"):
        table.add_column(column, justify="left" if column in ("model", "flags") else "right", overflow="fold")
    for r, row in zip(results, compare(results), strict=True):
        table.add_row(
            short_name(r.model),
            f"{r.perplexity.ppl:.4f}",
            ratio(row.ppl_ratio),
            percent(row.top1),
            percent(row.top1_retention),
            f"{human(r.params.total)} ({row.total_ratio:.2f}x)",
            f"{human(r.params.active)} ({row.active_ratio:.2f}x)",
            human(r.params.embedding),
            human(r.bytes_on_disk, "B"),
            f"{r.perplexity.tokens_per_s:.1f} ({ratio(row.speed_ratio)})",
            f"{r.perplexity.windows}x{r.seqlen}",
            "; ".join(row.flags) or ("" if row.comparable else "not comparable"),
        )
    return table


def _routing_table(results: list[EvalResult]) -> Table | None:
    moe = [r for r in results if r.routing]
    if not moe:
        return None
    table = Table(title="routing (over all MoE layers)")
    for column in ("model", "layers", "experts / top-k", "router entropy / log E", "load entropy / log E (min)", "busiest expert x E (max)"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in moe:
        layers = r.routing
        table.add_row(
            short_name(r.model),
            str(len(layers)),
            f"{layers[0].num_experts} / {layers[0].top_k}",
            f"{sum(x.router_entropy_norm for x in layers) / len(layers):.3f}",
            f"{min(x.load_entropy_norm for x in layers):.3f}",
            f"{max(x.max_load_ratio for x in layers):.2f}",
        )
    return table


def _dag_lines(results: list[EvalResult]) -> list[str]:
    """One line per model with DAG-MoE aggregators: their parameters and measured forward-time overhead."""
    lines = []
    for r in results:
        if not r.params.aggregator:
            continue
        moe_params = r.params.expert + r.params.aggregator  # routers and shared experts aside
        line = (f"{short_name(r.model)}: DAG aggregators {human(r.params.aggregator)} parameters "
                f"({r.params.aggregator / max(moe_params, 1):.2%} of the MoE layers' experts + aggregators)")
        if r.dag_overhead is not None:
            o = r.dag_overhead
            line += (f"; forward {o.overhead:+.1%} vs the plain expert sum ({o.tokens} tokens, "
                     f"median of {o.repeats}: {o.seconds_with:.3f} s vs {o.seconds_without:.3f} s, {r.device})")
        lines.append(line)
    return lines


@guarded
def eval_command(
    model: Annotated[str, typer.Argument(help="dense folder, .gguf file, moeconv checkpoint (native, exported or quantized)")],
    data: Annotated[str, typer.Option(help="text file, folder of .txt, .jsonl, or built-in corpus")] = DEFAULT_DATA,
    seqlen: Annotated[int, typer.Option(help="window length in tokens")] = 2048,
    max_tokens: Annotated[int | None, typer.Option(help="evaluate only the first N tokens")] = None,
    stride: Annotated[int | None, typer.Option(help="sliding windows: each scores only its last S tokens")] = None,
    compare_with: Annotated[
        list[str] | None, typer.Option("--compare", help="another model, or a results .json from --json (repeatable)")
    ] = None,
    json_file: Annotated[str | None, typer.Option("--json", help="write results + comparison as JSON to FILE ('-': stdout)")] = None,
    report: Annotated[Path | None, typer.Option(help="write DIR/report.md with PNG plots")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    batch_size: Annotated[int, typer.Option(help="windows per forward (0: 1 on CPU, 8 on GPU)")] = 0,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer folder or .gguf, if MODEL has none")] = None,
    text_field: Annotated[str, typer.Option(help="field holding the text in a .jsonl")] = "text",
    trust_remote_code: Annotated[bool, typer.Option(help="allow a checkpoint's own modeling code to run")] = False,
    engine: Annotated[str, typer.Option(help="auto (llama.cpp for a MoE .gguf), transformers, llama.cpp")] = "auto",
    lm_eval: Annotated[str | None, typer.Option("--lm-eval", help="lm-evaluation-harness tasks, comma-separated")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True)] = 0,
) -> None:
    """Measure perplexity (GPTQ/WikiText protocol), parameters, size, speed and expert routing."""
    setup_logging(verbose, quiet)
    settings = EvalSettings(
        data=data, text_field=text_field, seqlen=seqlen, stride=stride, max_tokens=max_tokens, batch_size=batch_size,
        dtype=dtype, device=device, tokenizer=tokenizer, trust_remote_code=trust_remote_code, engine=engine,
    )
    names = [model, *(compare_with or [])]
    saved = {name: load_results(name) for name in names if is_results_file(name)}  # bad files fail before any work
    results: list[EvalResult] = []
    to_stdout = json_file == "-"
    with _stage_progress(enabled=not (quiet or to_stdout)) as progress:
        for name in names:
            if name in saved:
                results.extend(saved[name])
            else:
                results.append(evaluate_model(name, settings, progress(short_name(name)), lm_eval))
    document = results_document(results)
    if to_stdout:
        emit_json(document)
    elif json_file:
        save_document(json_file, document)
    if report is not None:
        path = write_report(results, report)
        if not quiet:
            console.print(f"report written to {path}")
    if not (quiet or to_stdout):
        stdout.print(_results_table(results))
        routing = _routing_table(results)
        if routing is not None:
            stdout.print(routing)
        for line in _dag_lines(results):
            stdout.print(line)
