"""Balanced clustering of neurons by their activation patterns on calibration tokens."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from moeconv.ffn import DenseFFN
from moeconv.partition.kmeans import balanced_kmeans
from moeconv.partition.registry import Partitioner, PartitionResult, register_partitioner


def subsample_rows(x: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """At most `count` rows of x, drawn without replacement (all rows, in order, if there are fewer)."""
    if x.shape[0] <= count:
        return x
    rows = torch.randperm(x.shape[0], generator=generator)[:count].sort().values
    return x[rows]


def activation_features(ffn: DenseFFN, calib: Tensor, feature: str) -> Tensor:
    """Per-neuron activation pattern over the calibration tokens: [d_ff, T]."""
    h = ffn.intermediate(calib.to(ffn.up.dtype)).float()  # [T, d_ff]
    # Weighting by the down-projection norm makes the pattern the size of each neuron's output contribution.
    magnitude = h.abs() * ffn.down.float().norm(dim=0)  # [T, d_ff]
    if feature == "abs":
        return magnitude.T
    if feature == "binary":
        # "Active" = in the neuron's own top 10% of tokens, so every neuron has the same firing rate.
        threshold = magnitude.quantile(0.9, dim=0, keepdim=True)  # [1, d_ff]
        return (magnitude >= threshold).float().T
    # "centered": co-activation beyond each neuron's mean level.
    return (magnitude - magnitude.mean(dim=0, keepdim=True)).T


class CoactConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_tokens: int = Field(4096, ge=16, description="calibration tokens used for the activation patterns")
    feature: Literal["abs", "binary", "centered"] = "abs"
    iterations: int = Field(30, ge=1, description="maximum balanced k-means iterations")


@register_partitioner("coact")
class CoactPartitioner(Partitioner):
    """Neurons that fire on the same tokens go to the same expert (balanced spherical k-means on |h|)."""

    Config = CoactConfig
    needs_calibration = True

    def _partition(
        self, ffn: DenseFFN, num_experts: int, calib: Tensor | None, generator: torch.Generator, top_k: int | None
    ) -> PartitionResult:
        assert calib is not None
        tokens = subsample_rows(calib, self.config.max_tokens, generator)  # [T', d]
        features = activation_features(ffn, tokens, self.config.feature)  # [d_ff, T']
        assignment, similarity = balanced_kmeans(features, num_experts, self.config.iterations, generator)
        chosen = similarity.gather(1, assignment[:, None]).mean()
        return PartitionResult(assignment=assignment, metrics={"mean_centroid_similarity": float(chosen)})
