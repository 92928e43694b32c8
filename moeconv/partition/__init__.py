"""Neuron partitioners: split each dense FFN's neurons into equal experts (dot, random, kmeans, coact, cmoe, expertweaver)."""

from moeconv.partition import cmoe, coact, dot, expertweaver, kmeans, random  # noqa: F401  (each module registers itself)
from moeconv.partition.registry import (
    Partitioner,
    PartitionResult,
    available_partitioners,
    get_partitioner,
    register_partitioner,
)
from moeconv.partition.shared import select_shared_neurons

__all__ = [
    "PartitionResult",
    "Partitioner",
    "available_partitioners",
    "get_partitioner",
    "register_partitioner",
    "select_shared_neurons",
]
