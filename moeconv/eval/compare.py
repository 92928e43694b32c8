"""Side-by-side comparison of eval results with ratios to the first, refusing ratios between incomparable measurements."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from moeconv.errors import MoeconvError
from moeconv.eval.perplexity import EvalResult
from moeconv.io.files import atomic_write_text, strict_json

RESULTS_FORMAT = "moeconv-eval/1"


class ComparisonRow(BaseModel):
    """One model beside the baseline (the first result). A ratio is None where it would mislead."""

    model_config = ConfigDict(extra="forbid")

    model: str
    ppl: float
    ppl_ratio: float | None
    top1: float | None  # next-token accuracy (None: a result saved before moeconv measured it)
    top1_retention: float | None  # top1 / the baseline's: the share of next-token accuracy kept
    total_params: int
    total_ratio: float
    active_params: int
    active_ratio: float
    bytes_on_disk: int | None
    bytes_ratio: float | None
    tokens_per_s: float
    speed_ratio: float | None
    comparable: bool  # same text, tokenization, seqlen, stride and windows as the baseline
    flags: list[str]  # why a ratio is missing or to be read with care


def quality_mismatches(base: EvalResult, other: EvalResult) -> list[str]:
    """Reasons the two perplexities measure different things (empty: comparable)."""
    reasons = []
    if other.data_fingerprint != base.data_fingerprint:
        reasons.append(f"different data ({other.data} vs {base.data})")
    if other.seqlen != base.seqlen:
        reasons.append(f"seqlen {other.seqlen} vs {base.seqlen}")
    if other.stride != base.stride:
        reasons.append(f"stride {other.stride} vs {base.stride}")
    if other.perplexity.windows != base.perplexity.windows or other.perplexity.predicted != base.perplexity.predicted:
        reasons.append(f"{other.perplexity.windows} windows vs {base.perplexity.windows}")
    if other.data_fingerprint == base.data_fingerprint and other.tokens_fingerprint != base.tokens_fingerprint:
        reasons.append("different tokenization (per-token perplexities of different tokenizers)")
    return reasons


def speed_mismatches(base: EvalResult, other: EvalResult) -> list[str]:
    """Reasons the two tokens/s figures were measured under different conditions."""
    reasons = []
    for field in ("device", "dtype", "batch_size", "seqlen"):
        a, b = getattr(base, field), getattr(other, field)
        if a != b:
            reasons.append(f"speed: {field} {b} vs {a}")
    return reasons


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def compare(results: list[EvalResult]) -> list[ComparisonRow]:
    """Rows for every result, ratios taken to results[0]."""
    if not results:
        raise MoeconvError("nothing to compare; pass at least one model")
    base = results[0]
    rows = []
    for r in results:
        quality, speed = quality_mismatches(base, r), speed_mismatches(base, r)
        rows.append(
            ComparisonRow(
                model=r.model,
                ppl=r.perplexity.ppl,
                ppl_ratio=None if quality else r.perplexity.ppl / base.perplexity.ppl,
                top1=r.perplexity.top1,
                top1_retention=None if quality else _ratio(r.perplexity.top1, base.perplexity.top1),
                total_params=r.params.total,
                total_ratio=r.params.total / base.params.total,
                active_params=r.params.active,
                active_ratio=r.params.active / base.params.active,
                bytes_on_disk=r.bytes_on_disk,
                bytes_ratio=_ratio(r.bytes_on_disk, base.bytes_on_disk),
                tokens_per_s=r.perplexity.tokens_per_s,
                speed_ratio=None if speed else r.perplexity.tokens_per_s / base.perplexity.tokens_per_s,
                comparable=not quality,
                flags=quality + speed,
            )
        )
    return rows


def results_document(results: list[EvalResult]) -> dict:
    """What `--json FILE` writes: the results (each with all its settings) and the comparison."""
    return {
        "format": RESULTS_FORMAT,
        "results": [r.model_dump(mode="json") for r in results],
        "comparison": [row.model_dump(mode="json") for row in compare(results)],
    }


def save_results(path: str | Path, results: list[EvalResult]) -> None:
    save_document(path, results_document(results))


def save_document(path: str | Path, document: dict) -> None:
    """Strict JSON (never a bare NaN), written atomically."""
    atomic_write_text(Path(path), strict_json(document, sort_keys=False) + "\n")


def is_results_file(path: str | Path) -> bool:
    return str(path).endswith(".json") and Path(path).is_file()


def load_results(path: str | Path) -> list[EvalResult]:
    """Results saved by `moeconv eval --json FILE`, so earlier runs can be compared without re-running."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MoeconvError(f"cannot read eval results from {path}: {err}; pass a file written by moeconv eval --json") from None
    if not isinstance(doc, dict) or doc.get("format") != RESULTS_FORMAT:
        raise MoeconvError(f"{path} is not a moeconv eval results file ({RESULTS_FORMAT}); pass a file written by moeconv eval --json")
    try:
        return [EvalResult.model_validate(r) for r in doc["results"]]
    except (KeyError, TypeError, ValidationError) as err:
        first = str(err).splitlines()[0]
        raise MoeconvError(f"{path} has malformed results ({first}); re-create it with moeconv eval --json") from None
