"""Export targets: one class per serving format, registered by name (`moeconv export --to NAME`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moeconv.errors import MoeconvError


class ExportError(MoeconvError):
    """A checkpoint the chosen target cannot hold; the message names the reason and the alternative."""


@dataclass
class ExportOptions:
    """What the user chose besides SRC, OUT and the target."""

    tensor_type: str | None = None  # gguf: F32, F16, BF16, Q8_0, ... (None: the source dtype)
    route_epsilon: float = 1e-3  # mapped weight-1 routing: target deviation of a selected expert's weight from 1
    check_tokens: int = 256  # tokens the mapped routing is measured on (0: skip the measurement)
    max_shard_size: str = "2GB"


@dataclass
class ExportPlan:
    """Everything decided before a tensor is written: shown by --dry-run."""

    source: str
    target: str
    architecture: str  # what the serving stack sees: Qwen2MoeForCausalLM, MixtralForCausalLM, gguf qwen2moe, ...
    family: str
    layers: int
    experts: int  # 0 for a dense source
    top_k: int
    expert_size: int
    shared_size: int
    routing: str  # exact | mapped | dense
    routing_detail: str
    dtype: str
    tensors: list[str]
    output_bytes: int
    notes: list[str] = field(default_factory=list)  # what changes on the way (zero biases, constant gates, re-quantization)
    cannot_hold: list[str] = field(default_factory=list)  # what the target never holds (shown by --dry-run)
    routing_map: Any = None  # moeconv.export.routing.RoutingMap (None for a dense source)
    layout: dict[str, Any] = field(default_factory=dict)  # target-specific decisions the writer follows


class ExportTarget(ABC):
    """One output format: says what it cannot hold, plans, and writes into a PartialOutput."""

    name: str
    description: str
    accepts_dense: bool = False

    @abstractmethod
    def cannot_hold(self) -> list[str]:
        """What this target never holds, one phrase each (for --dry-run and `--to` help)."""

    @abstractmethod
    def plan(self, source, options: ExportOptions) -> ExportPlan:
        """The plan, or an ExportError when the source cannot be held."""

    @abstractmethod
    def write(self, source, plan: ExportPlan, options: ExportOptions, partial, progress: Callable[[str], None]) -> dict:
        """Write every file into partial.path; returns what the result reports beyond the plan."""


TARGETS: dict[str, ExportTarget] = {}


def register_target(cls: type[ExportTarget]) -> type[ExportTarget]:
    TARGETS[cls.name] = cls()
    return cls


def get_target(name: str) -> ExportTarget:
    if name not in TARGETS:
        raise ExportError(f"unknown export target '{name}'; choose one of: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]


def available_targets() -> dict[str, str]:
    """name -> one-line description."""
    return {name: t.description for name, t in sorted(TARGETS.items())}
