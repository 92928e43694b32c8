"""Evaluation: perplexity (GPTQ/WikiText protocol), parameters, size, speed, routing, comparison and reports."""

from moeconv.eval.compare import ComparisonRow, compare, load_results, save_results
from moeconv.eval.perplexity import EvalResult, EvalSettings, PerplexityResult, evaluate_model, evaluate_perplexity
from moeconv.eval.report import write_report
from moeconv.eval.stats import LayerRouting, ParameterCounts, RoutingRecorder, bytes_on_disk, count_parameters

__all__ = [
    "ComparisonRow",
    "EvalResult",
    "EvalSettings",
    "LayerRouting",
    "ParameterCounts",
    "PerplexityResult",
    "RoutingRecorder",
    "bytes_on_disk",
    "compare",
    "count_parameters",
    "evaluate_model",
    "evaluate_perplexity",
    "load_results",
    "save_results",
    "write_report",
]
