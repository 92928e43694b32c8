"""End-to-end distillation settings: `heal:` block of a convert recipe, or `moeconv heal` options."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moeconv.config.base import first_error


class HealConfig(BaseModel):
    """How the student is healed; `heal:` block of a convert recipe, or `moeconv heal` options."""

    model_config = ConfigDict(extra="forbid")

    tokens: int = Field(262144, ge=1, description="training tokens, rounded up to whole optimizer steps")
    seqlen: int = Field(512, ge=8, description="tokens per training window")
    batch: int = Field(8, ge=1, description="windows per optimizer step (over all processes)")
    micro_batch: int = Field(2, ge=1, description="windows per forward; gradients are accumulated up to `batch`")
    lr: float = Field(1e-4, gt=0, description="AdamW peak learning rate of all non-router parameters")
    router_lr: float | None = Field(None, gt=0, description="peak learning rate of the routers (None: same as lr)")
    freeze_router: bool = Field(False, description="keep the routers fixed during the heal")
    straight_through: bool = Field(
        True, description="scoring 'none': give the router a gradient through R + P - stopgrad(P); the forward is unchanged"
    )
    weight_decay: float = Field(1e-4, ge=0, description="AdamW decay of matrices (not of norms, biases or routers)")
    kl_weight: float = Field(2.0, ge=0, description="weight of KL(teacher || student) on the logits")
    ce_weight: float = Field(1.0, ge=0, description="weight of the next-token cross-entropy")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KL (scaled back by T^2)")
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of steps of linear warmup, then cosine decay")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of the peak")
    clip: float = Field(1.0, gt=0, description="gradient-norm clip of all non-router parameters together")
    router_clip: float = Field(1.0, gt=0, description="gradient-norm clip of the routers, on their own")
    checkpoint_every: int = Field(50, ge=0, description="optimizer steps between checkpoints (0: only after the last step)")
    log_every: int = Field(1, ge=1, description="optimizer steps averaged into one history entry")
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, and on a CPU with native bf16 matmuls (AVX512-BF16/AMX) on the fast engine")
    engine: Literal["fast", "reference"] = Field(
        "fast", description="fast: batched experts and KL/CE chunked over the vocabulary; reference: per-expert loop, full logits")
    epochs: int = Field(1, ge=1, description="passes over the distinct windows: tokens / epochs tokens of text, each seen `epochs` times")
    schedule: Literal["cosine", "wsd"] = Field(
        "cosine", description="cosine: warm-up then cosine to min_lr_ratio; wsd: warm-up, constant, linear decay over the last `decay`")
    decay: float = Field(0.3, gt=0, le=1, description="wsd: fraction of steps of the final linear decay")
    eval_every: int = Field(0, ge=0, description="optimizer steps between held-out KL measurements (0: none)")
    eval_tokens: int = Field(0, ge=0, description="held-out tokens measured every eval_every steps (windows of seqlen)")
    eval_source: str = Field("shakespeare:heldout", description="held-out text of the eval_every measurements")
    seed: int = 0
    source: str = Field("mix", description="training text: built-in corpus, file or folder (never a held-out split); "
                                           "the default is convert's calibration mix")
    text_field: str = "text"

    @model_validator(mode="after")
    def _eval_needs_tokens(self) -> HealConfig:
        if self.eval_every and not self.eval_tokens:
            raise ValueError("eval_every needs eval_tokens (held-out tokens to measure, e.g. 4096)")
        return self

    def steps(self) -> int:
        return -(-self.tokens // (self.batch * self.seqlen))

    def distinct_windows(self) -> int:
        """Windows of text the heal reads; each is trained on `epochs` times (the last pass may be cut short)."""
        return -(-self.steps() * self.batch // self.epochs)


def heal_config(data: dict | None, where: str = "recipe heal") -> HealConfig:
    """A HealConfig from a recipe's `heal:` mapping; a bad field is a one-line RecipeError."""
    try:
        return HealConfig.model_validate(data or {})
    except ValidationError as err:
        raise first_error(err, where) from None
