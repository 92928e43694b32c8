"""Export a moeconv checkpoint to formats serving stacks load without moeconv: Qwen2-MoE, Mixtral, GGUF."""

from moeconv.export import gguf, mixtral, qwen2_moe  # noqa: F401 - each registers its target
from moeconv.export.api import check_ids, export
from moeconv.export.registry import ExportError, ExportOptions, ExportPlan, available_targets, get_target

__all__ = ["export", "check_ids", "ExportError", "ExportOptions", "ExportPlan", "available_targets", "get_target"]
