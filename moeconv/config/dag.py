"""DAG-MoE aggregator settings (recipe block `dag:`): its shape, the layer-local step, the end-to-end step."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DagTrainConfig(BaseModel):
    """How one layer's aggregator is distilled to the dense FFN output on captured inputs."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(300, ge=0, description="optimizer steps (0 only measures)")
    lr: float = Field(3e-3, gt=0, description="AdamW peak learning rate of the aggregator")
    warmup: int = Field(20, ge=0, description="linear warm-up steps before the cosine decay to 0")
    weight_decay: float = Field(0.0, ge=0)
    batch: int = Field(512, ge=1, description="tokens per step (1024 measured no better on SmolLM2)")
    max_tokens: int = Field(32768, ge=1, description="training tokens drawn from the captured rows")
    holdout_fraction: float = Field(0.1, gt=0, lt=1, description="captured rows kept for metrics")
    max_holdout: int = Field(4096, ge=1, description="cap on held-out rows")
    train_router: bool = Field(False, description="also train the router (needs scoring softmax or sigmoid)")
    router_lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate of the router")
    clip: float = Field(1.0, gt=0, description="gradient norm clip")


class DagEndToEndConfig(BaseModel):
    """The recipe's `dag.end_to_end:` block. Only the aggregators train; routers, experts and the rest stay fixed.

    The layer-local objective fits each layer's FFN output in isolation, with every output direction weighted the
    same; on SmolLM2 that lowered each layer's error yet raised perplexity. Training all aggregators together on
    the teacher's next-token distribution weights the errors by what they do to the logits.
    """

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(3, ge=1, description="passes over the training windows (the calibration budget is reused)")
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate (warm-up, then cosine decay to 0)")
    batch: int = Field(4, ge=1, description="windows per optimizer step")
    micro_batch: int = Field(2, ge=1, description="windows per forward (gradients accumulate up to batch)")
    holdout_fraction: float = Field(0.1, gt=0, lt=1, description="last calibration windows kept to accept or reject the result")


class DagConfig(BaseModel):
    """The recipe's `dag:` block: the aggregator's shape plus how to train it.

    `architecture()` (everything but how it is trained) is what config.json stores as moe.dag and what
    DagAggregator takes as keyword arguments.
    """

    model_config = ConfigDict(extra="forbid")
    d_g: int = Field(24, ge=1, description="width of the message space (d -> d_g -> d per round)")
    rounds: int = Field(2, ge=1, description="message-passing rounds L")
    stabilize: bool = Field(True, description="add x/k to every node before the rounds (subtracted again at the end)")
    train: DagTrainConfig = Field(default_factory=DagTrainConfig)
    end_to_end: DagEndToEndConfig | None = Field(
        None, description="after the layer-local step, train all aggregators together on KL to the dense teacher")

    def architecture(self) -> dict:
        return self.model_dump(exclude={"train", "end_to_end"})
