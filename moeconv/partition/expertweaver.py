"""ExpertWeaver (Zhao et al., "ExpertWeaver: Unlocking the Inherent MoE in Dense LLMs with GLU Activation Patterns", arXiv 2602.15521)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from transformers.activations import ACT2FN

from moeconv.ffn import DenseFFN
from moeconv.partition.cmoe import CHUNK, MIN_TOKENS, check_statistics_request
from moeconv.partition.coact import subsample_rows
from moeconv.partition.kmeans import balanced_kmeans
from moeconv.partition.registry import Partitioner, PartitionResult, register_partitioner


class ExpertWeaverConfig(BaseModel):
    """Settings of our reading of the paper (its full text and code were not available to us: see the class doc)."""

    model_config = ConfigDict(extra="forbid")
    max_tokens: int = Field(8192, ge=MIN_TOKENS, description="calibration tokens for the statistics and the clustering")
    cv_threshold: float = Field(
        0.5, gt=0, description="a neuron whose |gate activation| has a coefficient of variation below this is universal"
    )
    features: Literal["activations", "gate_rows"] = Field(
        "activations", description="what balanced k-means clusters: gate activation patterns over tokens, or gate rows"
    )
    iterations: int = Field(30, ge=1, description="maximum balanced k-means iterations (stops early when stable)")


def gate_activations(ffn: DenseFFN, x: Tensor) -> Tensor:
    """The GLU gate's output act(W_gate x + b) (act(W_up x + b) for a non-gated FFN).  [T, d] -> [T, d_ff]"""
    rows, bias = (ffn.up, ffn.up_bias) if ffn.gate is None else (ffn.gate, ffn.gate_bias)
    bias = None if bias is None else bias.float()
    return ACT2FN[ffn.act](torch.nn.functional.linear(x.float(), rows.float(), bias))


def coefficient_of_variation(ffn: DenseFFN, x: Tensor) -> Tensor:
    """[d_ff] std / mean of each neuron's |gate activation| over the tokens x [T, d] (float64 sums, chunked)."""
    first = torch.zeros(ffn.d_ff, dtype=torch.float64)
    second = torch.zeros(ffn.d_ff, dtype=torch.float64)
    for start in range(0, x.shape[0], CHUNK):
        a = gate_activations(ffn, x[start : start + CHUNK]).abs().double()  # [t, d_ff]
        first += a.sum(0)
        second += a.square().sum(0)
    mean = first / x.shape[0]
    std = (second / x.shape[0] - mean.square()).clamp_min(0).sqrt()
    return (std / mean.clamp_min(1e-30)).float()


def gate_row_means(ffn: DenseFFN, assignment: Tensor, num_experts: int) -> Tensor:
    """[E, d] mean gate row (up row for a non-gated FFN) of each expert's neurons: the router."""
    rows = (ffn.up if ffn.gate is None else ffn.gate).float()  # [n, d]
    sums = torch.zeros(num_experts, rows.shape[1]).index_add_(0, assignment, rows)  # [E, d]
    return sums / torch.bincount(assignment, minlength=num_experts)[:, None].float()


@register_partitioner("expertweaver")
class ExpertWeaverPartitioner(Partitioner):
    """Universal (shared) neurons = the most consistently active ones; the rest in equal experts by balanced k-means;
    the router's row for an expert = the mean gate row of its neurons.

    "Consistently active" is measured per neuron by the coefficient of variation (std / mean over calibration tokens) of
    |act(W_gate x)|, the GLU gate's output: the shared neurons are the ones with the lowest CV. Routed neurons are
    clustered by balanced spherical k-means (moeconv.partition.kmeans) on their gate activation patterns over the
    calibration tokens (`features: gate_rows` clusters the L2-normalised gate rows instead). The router needs no
    training: an expert's logit is the mean gate pre-activation of its neurons, so the experts whose gates open most
    are selected; selected experts are summed with weight 1 (the recipe's `scoring: none`).

    Sources and deviations: the paper's method section and code could not be read for this implementation; it follows
    its abstract (universal vs specialised neurons from GLU activation patterns, shared + routed experts with
    layer-adaptive configurations, training-free) and the issue's summary (per-layer shared size from each neuron's CV,
    balanced k-means, a linear router from the cluster means of gate rows). The CV threshold, the clustering features
    and the iteration count are our choices. Per-layer shared sizes cannot be stored (config.json has one shared_size
    for all layers): the recipe's `shared_neurons` is used in every layer, and the size the CV rule would pick there
    (neurons with CV < cv_threshold) is reported as the metric `shared_paper_size`. Non-gated FFNs use the up
    projection in place of the gate.
    """

    Config = ExpertWeaverConfig
    needs_calibration = True

    def select_shared(self, ffn: DenseFFN, calib: Tensor, count: int) -> tuple[Tensor, dict[str, float]]:
        x = check_statistics_request("expertweaver", ffn, calib, count)[: self.config.max_tokens]
        cv = coefficient_of_variation(ffn, x)  # [d_ff]
        shared = torch.argsort(cv, stable=True)[:count].sort().values  # lowest CV first; ties to the lower index
        metrics = {"paper_size": float((cv < self.config.cv_threshold).sum()), "cv_median": float(cv.median())}
        if count:
            metrics["cv_max_kept"] = float(cv[shared].max())
        return shared, metrics

    def _partition(
        self, ffn: DenseFFN, num_experts: int, calib: Tensor | None, generator: torch.Generator, top_k: int | None
    ) -> PartitionResult:
        config: ExpertWeaverConfig = self.config
        x = subsample_rows(check_statistics_request("expertweaver", ffn, calib, 0), config.max_tokens, generator)
        if config.features == "activations":
            features = gate_activations(ffn, x).T  # [n, T]
        else:
            features = (ffn.up if ffn.gate is None else ffn.gate).float()  # [n, d]
        assignment, similarity = balanced_kmeans(features, num_experts, config.iterations, generator)
        router = gate_row_means(ffn, assignment, num_experts)  # [E, d]
        metrics = {"mean_centroid_similarity": float(similarity.gather(1, assignment[:, None]).mean())}
        return PartitionResult(assignment=assignment, router=router, metrics=metrics)
