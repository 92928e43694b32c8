"""Partitioner interface, result type and the registry of partitioners by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import pydantic
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from moeconv.errors import RecipeError
from moeconv.ffn import DenseFFN
from moeconv.partition.shared import select_shared_neurons


@dataclass
class PartitionResult:
    """Which expert each FFN neuron goes to, plus what the method learned on the way."""

    assignment: Tensor  # [d_ff] int64; every expert holds exactly d_ff / E neurons
    router: Tensor | None = None  # [E, d] router learned jointly with the partition (dot); None otherwise
    metrics: dict[str, float] = field(default_factory=dict)


class EmptyConfig(BaseModel):
    """Config of a partitioner that has no settings."""

    model_config = ConfigDict(extra="forbid")


class Partitioner(ABC):
    """Splits the d_ff neurons of one dense FFN into `num_experts` equal experts."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]] = EmptyConfig
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: BaseModel | dict | None = None):
        if config is None:
            config = {}
        if isinstance(config, BaseModel) and not isinstance(config, self.Config):
            config = config.model_dump()
        if isinstance(config, dict):
            try:
                config = self.Config(**config)
            except pydantic.ValidationError as err:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<config>'}: {e['msg']}" for e in err.errors())
                raise RecipeError(
                    f"partitioner {self.name!r}: bad config ({problems}); "
                    f"valid fields: {', '.join(self.Config.model_fields) or 'none'}"
                ) from None
        self.config = config

    def partition(
        self,
        ffn: DenseFFN,
        num_experts: int,
        calib: Tensor | None,
        generator: torch.Generator,
        top_k: int | None = None,
    ) -> PartitionResult:
        """Check the request, then run the method. top_k: the MoE's experts per token (used by dot)."""
        check_expert_count(ffn.d_ff, num_experts)
        if self.needs_calibration and (calib is None or calib.shape[0] == 0):
            raise RecipeError(
                f"partitioner {self.name!r} needs calibration hidden states; provide calibration data "
                "or pick a partitioner that needs none (random, kmeans)"
            )
        if calib is not None and calib.shape[-1] != ffn.d_model:
            raise RecipeError(f"calibration width {calib.shape[-1]} does not match the FFN input width {ffn.d_model}")
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise RecipeError(f"top_k={top_k} must be between 1 and the number of experts ({num_experts})")
        result = self._partition(ffn, num_experts, calib, generator, top_k)
        check_balanced(result.assignment, num_experts)
        return result

    def work(self, tokens: int, d: int, d_ff: int) -> float:
        """Matrix-product FLOPs of one layer's partition on `tokens` calibration tokens, for convert --dry-run's time
        estimate: one activation pass over at most 16K tokens, unless a method counts its own iterations."""
        return 6.0 * min(tokens, 16384) * d * d_ff if self.needs_calibration else 0.0

    def select_shared(self, ffn: DenseFFN, calib: Tensor, count: int) -> tuple[Tensor, dict[str, float]]:
        """([count] sorted ids of the always-active neurons, what the choice measured). Default: the largest mean |h|;
        a method with its own rule (cmoe, expertweaver) overrides this."""
        return select_shared_neurons(ffn, calib, count), {}

    @abstractmethod
    def _partition(
        self, ffn: DenseFFN, num_experts: int, calib: Tensor | None, generator: torch.Generator, top_k: int | None
    ) -> PartitionResult: ...


def check_expert_count(d_ff: int, num_experts: int) -> None:
    if num_experts < 1 or d_ff % num_experts != 0:
        raise RecipeError(
            f"cannot split {d_ff} FFN neurons into {num_experts} equal experts; choose an expert count that divides {d_ff}"
        )


def check_balanced(assignment: Tensor, num_experts: int) -> None:
    """Internal invariant: every expert holds exactly d_ff / E neurons."""
    counts = torch.bincount(assignment, minlength=num_experts)
    if assignment.dtype != torch.int64 or counts.numel() != num_experts or not bool((counts == counts[0]).all()):
        raise AssertionError(f"unbalanced partition: expert sizes {counts.tolist()}")


_REGISTRY: dict[str, type[Partitioner]] = {}
P = TypeVar("P", bound=type[Partitioner])


def register_partitioner(name: str):
    """Class decorator: make a Partitioner available under `name`."""

    def register(cls: P) -> P:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"partitioner {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def available_partitioners() -> list[str]:
    return sorted(_REGISTRY)


def get_partitioner(name: str, config: dict | None = None) -> Partitioner:
    """The partitioner registered under `name`, built from `config` (RecipeError on unknown name or field)."""
    if name not in _REGISTRY:
        raise RecipeError(f"unknown partitioner {name!r}; choose one of: {', '.join(available_partitioners())}")
    return _REGISTRY[name](config)
