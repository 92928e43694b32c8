"""Balanced (equal-size) spherical k-means on the FFN's input weight rows (MoEfication / LLaMA-MoE)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from moeconv.ffn import DenseFFN
from moeconv.partition.registry import Partitioner, PartitionResult, register_partitioner
from moeconv.partition.sinkhorn import greedy_balanced_assignment


def balanced_kmeans(features: Tensor, num_experts: int, iterations: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Equal-size clusters of the rows of `features` [n, f] by cosine similarity.

    Each iteration assigns rows to centroids with the capacity-respecting greedy rounding (highest
    similarities first) and recomputes the centroids. Returns (assignment [n] int64, similarity [n, E]).
    """
    n = features.shape[0]
    capacity = n // num_experts
    points = torch.nn.functional.normalize(features.float(), dim=1)  # [n, f]
    # k-means++ seeding on cosine distance: spreads the starting centroids out.
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [points[first]]
    closest = 1.0 - points @ points[first]  # [n]
    for _ in range(1, num_experts):
        weights = closest.clamp_min(0) + 1e-12
        pick = int(torch.multinomial(weights, 1, generator=generator))
        centroids.append(points[pick])
        closest = torch.minimum(closest, 1.0 - points @ points[pick])
    centre = torch.stack(centroids)  # [E, f]
    assignment = torch.full((n,), -1, dtype=torch.int64)
    similarity = points @ centre.T  # [n, E]
    for _ in range(iterations):
        new_assignment = greedy_balanced_assignment(similarity, capacity)
        if torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        sums = torch.zeros_like(centre).index_add_(0, assignment, points)  # [E, f]
        centre = torch.nn.functional.normalize(sums, dim=1)
        similarity = points @ centre.T  # [n, E]
    return assignment, similarity


class KMeansConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    iterations: int = Field(30, ge=1, description="maximum k-means iterations (stops early when stable)")


@register_partitioner("kmeans")
class KMeansPartitioner(Partitioner):
    """Balanced k-means on L2-normalised [gate; up] rows (up rows for non-gated FFNs)."""

    Config = KMeansConfig
    needs_calibration = False

    def _partition(
        self, ffn: DenseFFN, num_experts: int, calib: Tensor | None, generator: torch.Generator, top_k: int | None
    ) -> PartitionResult:
        up = torch.nn.functional.normalize(ffn.up.float(), dim=1)  # [d_ff, d]
        if ffn.gate is None:
            features = up
        else:
            gate = torch.nn.functional.normalize(ffn.gate.float(), dim=1)  # [d_ff, d]
            features = torch.cat([gate, up], dim=1)  # [d_ff, 2d]
        assignment, similarity = balanced_kmeans(features, num_experts, self.config.iterations, generator)
        chosen = similarity.gather(1, assignment[:, None]).mean()
        return PartitionResult(assignment=assignment, metrics={"mean_centroid_similarity": float(chosen)})
