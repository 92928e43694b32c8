"""The refit stage's settings (recipe block `refit:`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class RefitConfig(BaseModel):
    """Least-squares refit of the down projection (recipe block `refit:`)."""

    model_config = ConfigDict(extra="forbid")
    # Measured on SmolLM2-135M (layers 0, 1, 5, 11 at (8,4), 16K tokens): the best ridge ranged from 0.01 to 0.5
    # by layer, and the held-out windows picked the same value as unseen text did; so every candidate is tried.
    damp: list[float] = Field([0.01, 0.03, 0.1, 0.3, 1.0], min_length=1,
                              description="ridge strengths towards the dense weights (fractions of the mean Gram "
                                          "diagonal); the one with the lowest held-out error is used")
    holdout_fraction: float = Field(0.1, gt=0, lt=1, description="calibration tokens kept out of the fit to judge it: the last ones, i.e. the last windows")
    precision: Literal["auto", "float32", "float64"] = Field(
        "auto", description="arithmetic of the solve: auto = float32 unless the ridge leaves the system too ill-conditioned "
                            "for it (condition bound above 1.6e4), then float64 for that candidate; float64 = the old "
                            "all-float64 path")
    target: Literal["ffn", "layer"] = Field(
        "layer", description="what the refitted FFN reproduces: ffn = the dense FFN on the same inputs; layer = the dense "
                           "model's layer output, so the FFN also undoes the error that the converted layers before it "
                           "left (needs calibration.inputs: converted; unset, it is ffn when the inputs are dense; "
                           "families that normalize the FFN output before the residual add, olmo2 and gemma2/3, fall "
                           "back to ffn)")
    chunk: int = Field(4096, ge=1, description="tokens per accumulation chunk (bounds memory)")

    @field_validator("damp", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, int | float) else v

    @field_validator("damp")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(d <= 0 for d in v):
            raise ValueError(f"every damp must be > 0, got {v}")
        return v
