"""Markdown report with PNG plots (perplexity per model, per-layer expert-load heatmap) for eval results."""

from __future__ import annotations

import re
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moeconv.eval.compare import ComparisonRow, compare
from moeconv.eval.perplexity import EvalResult


def short_name(model: str) -> str:
    return Path(model).name or model


def human(n: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M'; None -> '-'."""
    if n is None:
        return "-"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def ratio(value: float | None) -> str:
    return "n/c" if value is None else f"{value:.3f}x"


def percent(value: float | None) -> str:
    """0.4213 -> '42.13%'; None (not measured, or not comparable) -> 'n/c'."""
    return "n/c" if value is None else f"{100 * value:.2f}%"


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)  # Agg canvas: no display needed, no global pyplot state
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_perplexity(results: list[EvalResult], rows: list[ComparisonRow], path: Path) -> None:
    """Bars of perplexity per model; measurements not comparable to the first are hatched and labelled."""
    fig = Figure(figsize=(max(4.0, 1.4 * len(results) + 2), 3.6))
    ax = fig.add_subplot()
    names = [short_name(r.model) for r in results]
    values = [r.perplexity.ppl for r in results]
    bars = ax.bar(range(len(values)), values, color=["#4c72b0" if row.comparable else "#bbbbbb" for row in rows])
    for bar, row in zip(bars, rows, strict=True):
        if not row.comparable:
            bar.set_hatch("//")
        label = f"{row.ppl:.2f}" + ("" if row.comparable else " (n/c)")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(values)), names, rotation=20, ha="right", fontsize=8)
    base = results[0]
    ax.set_ylabel("perplexity")
    ax.set_title(f"{short_name(base.data)}, seqlen {base.seqlen}, {base.perplexity.windows} windows", fontsize=9)
    _save(fig, path)


def plot_expert_load(result: EvalResult, path: Path) -> None:
    """Heatmap layers x experts of load x E (1 = the balanced share)."""
    layers = result.routing
    width = max(len(layer.load) for layer in layers)
    grid = [[v * layer.num_experts for v in layer.load] + [float("nan")] * (width - len(layer.load)) for layer in layers]
    fig = Figure(figsize=(min(14.0, 2.5 + 0.35 * width), 1.5 + 0.25 * len(layers)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(layer.layer) for layer in layers], fontsize=7)
    ax.set_title(f"expert load x E (1 = balanced): {short_name(result.model)}", fontsize=9)
    fig.colorbar(image, ax=ax)
    _save(fig, path)


def _settings_table(results: list[EvalResult]) -> list[str]:
    lines = ["| model | data (fingerprint) | tokenization | seqlen | stride | windows | tokens scored | dtype | device | batch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r.perplexity
        lines.append(f"| {short_name(r.model)} | {short_name(r.data)} ({r.data_fingerprint}) | {r.tokens_fingerprint} | {r.seqlen} "
                     f"| {r.stride} | {p.windows} | {p.predicted} | {r.dtype} | {r.device} | {r.batch_size} |")
    return lines


def _results_table(results: list[EvalResult], rows: list[ComparisonRow]) -> list[str]:
    lines = ["| model | perplexity | vs first | top-1 accuracy | top-1 kept | total params | active params | embedding | on disk "
             "| tokens/s | flags |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, row in zip(results, rows, strict=True):
        lines.append(
            f"| {short_name(r.model)} | {r.perplexity.ppl:.4f} | {ratio(row.ppl_ratio)} | {percent(row.top1)} "
            f"| {percent(row.top1_retention)} | {human(r.params.total)} ({ratio(row.total_ratio)}) "
            f"| {human(r.params.active)} ({ratio(row.active_ratio)}) | {human(r.params.embedding)} | {human(r.bytes_on_disk, 'B')} "
            f"| {r.perplexity.tokens_per_s:.1f} ({ratio(row.speed_ratio)}) | {'; '.join(row.flags) or 'comparable'} |"
        )
    return lines


def _routing_table(result: EvalResult) -> list[str]:
    lines = ["| layer | experts | top-k | tokens | router entropy (nats) | router entropy / log E | load entropy / log E | busiest expert x E |",
             "|---|---|---|---|---|---|---|---|"]
    for layer in result.routing:
        lines.append(f"| {layer.layer} | {layer.num_experts} | {layer.top_k} | {layer.tokens} | {layer.router_entropy:.3f} "
                     f"| {layer.router_entropy_norm:.3f} | {layer.load_entropy_norm:.3f} | {layer.max_load_ratio:.2f} |")
    return lines


def write_report(results: list[EvalResult], out_dir: str | Path) -> Path:
    """Write OUT/report.md and its PNG plots; returns the markdown file's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = compare(results)
    plot_perplexity(results, rows, out / "perplexity.png")
    md = [
        "# moeconv eval report",
        "",
        "Perplexity by the GPTQ/WikiText protocol: documents joined with a blank line, tokenized once, cut into windows of "
        "`seqlen` tokens (non-overlapping unless a stride is given; the remainder is dropped), "
        "ppl = exp(mean NLL over predicted tokens). Not comparable with lm-evaluation-harness's `wikitext` word perplexity.",
        "Ratios are to the first model; `n/c` marks a ratio refused because the measurements differ (see flags). "
        "Top-1 accuracy: the share of predicted tokens that are the model's most likely next token; top-1 kept: that "
        "accuracy over the first model's (the share of performance kept).",
        "",
        "## Settings",
        "",
        *_settings_table(results),
        "",
        "## Results",
        "",
        *_results_table(results, rows),
        "",
        "![perplexity per model](perplexity.png)",
        "",
    ]
    for i, r in enumerate(results):
        if not r.routing:
            continue
        image = f"expert_load_{i}_{re.sub(r'[^A-Za-z0-9_.-]', '_', short_name(r.model))}.png"
        plot_expert_load(r, out / image)
        md += [f"## Routing: {short_name(r.model)}", "", f"![expert load]({image})", "", *_routing_table(r), ""]
    for r in results:
        if r.lm_eval:
            md += [f"## lm-evaluation-harness: {short_name(r.model)}", "", "```", str(r.lm_eval["results"]), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
