"""Quantization recipes: what `moeconv quantize` does, as a pydantic model (extra="forbid")."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from moeconv.quant.grids import ClipSearch, QuantSpec
from moeconv.recipe import CalibrationSpec, Strict, load_yaml_recipe, parse_size

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
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
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
