"""Quantization settings: the grid a tensor is quantized to, and the `moeconv quantize` recipe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from moeconv.config.base import Strict, load_yaml_recipe, parse_size
from moeconv.config.convert import CalibrationSpec
from moeconv.errors import RecipeError

INT_BITS = (8, 4, 3, 2)
TERNARY_FORMATS = ("ternary", "sub1")
FORMATS = tuple(f"int{b}" for b in INT_BITS) + TERNARY_FORMATS


class QuantCalibrationSpec(CalibrationSpec):
    """Shakespeare's train split by default, as every quantization table in RESULTS.md was calibrated (convert's
    default is the mix, which has not been measured for GPTQ)."""

    source: str = "shakespeare"


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize to: `bits` is 8/4/3/2 or "ternary"/"sub1" (sub1 = ternary grid + dictionary code).

    group_size: input features sharing one scale (-1 = one per row); ternary grids are always per row.
    symmetric: intN only; symmetric grids store no zero points (GPTQ convention: zero = 2^(b-1)).
    float_zeros: intN only; fp16 zero points and each group's exact [min, max] (GGUF Q4_1 / HQQ style)
        instead of integer zero points on a range that must contain 0. Reproduces a Q4_1 source exactly
        at group size 32.
    """

    bits: int | str = 4
    group_size: int = 128
    symmetric: bool = False
    float_zeros: bool = False

    def __post_init__(self) -> None:
        is_int = isinstance(self.bits, int) and not isinstance(self.bits, bool) and self.bits in INT_BITS
        if not is_int and self.bits not in TERNARY_FORMATS:
            raise RecipeError(f"unsupported quantization width {self.bits!r}; use one of 8, 4, 3, 2, 'ternary', 'sub1'")
        if self.is_ternary:  # per-row lo/hi by definition: normalise so equal specs compare equal
            object.__setattr__(self, "group_size", -1)
            object.__setattr__(self, "symmetric", False)
            object.__setattr__(self, "float_zeros", False)
        elif self.symmetric and self.float_zeros:
            raise RecipeError("a symmetric grid has no zero points; drop either symmetric or float_zeros")
        elif not (self.group_size == -1 or (isinstance(self.group_size, int) and self.group_size > 0)):
            raise RecipeError(f"group size {self.group_size!r} is invalid; use a positive integer or -1 (per row)")

    @classmethod
    def from_format(cls, fmt: str, group_size: int = 128, symmetric: bool = False, float_zeros: bool = False) -> QuantSpec:
        """`fmt` is one of FORMATS ("int4", "ternary", ...)."""
        if fmt not in FORMATS:
            raise RecipeError(f"unsupported quantization format {fmt!r}; use one of {', '.join(FORMATS)}")
        return cls(fmt if fmt in TERNARY_FORMATS else int(fmt[3:]), group_size, symmetric, float_zeros)

    @property
    def is_ternary(self) -> bool:
        return self.bits in TERNARY_FORMATS

    @property
    def format(self) -> str:
        return str(self.bits) if self.is_ternary else f"int{self.bits}"

    @property
    def maxq(self) -> int:
        """Largest integer code (ternary symbols are 0, 1 = lo, 2 = hi)."""
        return 2 if self.is_ternary else 2**self.bits - 1

    def group_width(self, in_features: int) -> int:
        """Columns per group for a matrix with `in_features` columns; raises RecipeError if it does not divide."""
        if self.group_size == -1:
            return in_features
        if in_features % self.group_size:
            raise RecipeError(
                f"group size {self.group_size} does not divide in-features {in_features}; "
                f"use a divisor of {in_features} or -1 (per row)"
            )
        return self.group_size


@dataclass(frozen=True)
class ClipSearch:
    """Range search for intN grids: try the group's [min, max] shrunk by 1, 1 - step, ... down to 1 - max_shrink
    and keep, per group, the grid whose (optionally column-weighted) squared rounding error is smallest."""

    max_shrink: float = 0.25
    step: float = 0.01

    def __post_init__(self) -> None:
        if not (0 <= self.max_shrink < 1) or self.step <= 0:
            raise RecipeError(f"clip search max_shrink {self.max_shrink} / step {self.step} invalid; "
                              "use 0 <= max_shrink < 1 and step > 0")

    @property
    def factors(self) -> list[float]:
        return [1.0 - i * self.step for i in range(int(round(self.max_shrink / self.step)) + 1)]


BITS_CHOICES = ("8", "4", "3", "2", "ternary", "sub1")


class QuantRecipe(Strict):
    """One width for every quantized linear of the decoder layers (routers, norms, embeddings, lm_head stay as they are).

    min_expert_tokens: an expert that received fewer calibration tokens than this gets the Hessian pooled over
    all experts of its layer (`sparse_experts: pooled`) or plain round-to-nearest (`sparse_experts: rtn`).
    """

    bits: str = "4"
    group_size: int = 128  # input features per scale; -1 = one per row; ignored by ternary/sub1 (per row)
    symmetric: bool = False
    float_zeros: bool = False  # intN: fp16 zero points on each group's exact range (the GGUF Q4_1 layout at group 32)
    method: Literal["gptq", "rtn"] = "gptq"
    damp: float = Field(0.01, ge=0)  # GPTQ: 0.01; QMoE uses 0.1 for ternary
    act_order: bool = False
    clip_search: float = Field(0.0, ge=0, lt=1)  # intN: try each group's range shrunk down to (1 - this); 0 = min/max
    block_size: int = Field(128, ge=1)
    calibration: QuantCalibrationSpec = Field(default_factory=QuantCalibrationSpec)
    batch_size: int = Field(8, ge=1)  # calibration windows per forward
    min_expert_tokens: int = Field(128, ge=0)
    sparse_experts: Literal["pooled", "rtn"] = "pooled"
    exclude: list[str] = Field(default_factory=list)  # fnmatch patterns of module names kept in high precision
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # of the tensors kept in high precision
    max_shard_size: str = "1GB"

    @field_validator("bits", mode="before")
    @classmethod
    def _bits(cls, v: Any) -> str:
        text = str(v).strip().lower().removeprefix("int")
        if text not in BITS_CHOICES:
            raise ValueError(f"unsupported width {v!r}; use one of {', '.join(BITS_CHOICES)}")
        return text

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"group size {v} is invalid; use a positive integer or -1 (one group per row)")
        return v

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v

    @model_validator(mode="after")
    def _zeros(self) -> QuantRecipe:
        if self.float_zeros and self.symmetric:
            raise ValueError("float_zeros: a symmetric grid has no zero points; drop --symmetric or --float-zeros")
        if self.float_zeros and self.bits in ("ternary", "sub1"):
            raise ValueError(f"float_zeros: {self.bits} grids have no zero points (per-row lo/hi); drop --float-zeros")
        return self

    @property
    def spec(self) -> QuantSpec:
        bits: int | str = self.bits if self.bits in ("ternary", "sub1") else int(self.bits)
        return QuantSpec(bits, self.group_size, self.symmetric, self.float_zeros)

    @property
    def clip(self) -> ClipSearch | None:
        return ClipSearch(self.clip_search) if self.clip_search > 0 else None

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"


def load_quant_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> QuantRecipe:
    return load_yaml_recipe(QuantRecipe, path, overrides, "configs/gptq-int4.yaml")
