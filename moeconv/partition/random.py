"""Balanced random split of the FFN neurons (the LLaMA-MoE released-model baseline)."""

from __future__ import annotations

import torch
from torch import Tensor

from moeconv.ffn import DenseFFN
from moeconv.partition.registry import Partitioner, PartitionResult, register_partitioner


@register_partitioner("random")
class RandomPartitioner(Partitioner):
    """Each expert gets d_ff / E neurons drawn uniformly without replacement (seeded)."""

    needs_calibration = False

    def _partition(
        self, ffn: DenseFFN, num_experts: int, calib: Tensor | None, generator: torch.Generator, top_k: int | None
    ) -> PartitionResult:
        size = ffn.d_ff // num_experts
        permutation = torch.randperm(ffn.d_ff, generator=generator)  # [d_ff]
        assignment = torch.empty(ffn.d_ff, dtype=torch.int64)
        assignment[permutation] = torch.arange(ffn.d_ff) // size
        return PartitionResult(assignment=assignment)
