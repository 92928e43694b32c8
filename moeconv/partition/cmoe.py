"""CMoE (Pei et al., "CMoE: Fast Carving of Mixture-of-Experts for Efficient LLM Inference", arXiv 2502.04416)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from transformers.activations import ACT2FN

from moeconv.errors import RecipeError
from moeconv.ffn import DenseFFN
from moeconv.partition.balanced import balanced_assignment
from moeconv.partition.coact import subsample_rows
from moeconv.partition.registry import Partitioner, PartitionResult, register_partitioner

MIN_TOKENS = 16  # activation statistics from fewer tokens than this are noise
CHUNK = 4096  # tokens per step wherever a [T, d_ff] matrix would otherwise exist at once


class CMoEConfig(BaseModel):
    """Defaults of the paper's public code: K_a = 10, one balanced-assignment pass, 8 x 2048 calibration tokens."""

    model_config = ConfigDict(extra="forbid")
    k_act: int = Field(10, ge=1, description="K_a: neurons marked active per token (largest |normalized activation|)")
    max_tokens: int = Field(16384, ge=MIN_TOKENS, description="calibration tokens used for the activation markers")
    iterations: int = Field(1, ge=1, description="balanced-assignment / centroid-update rounds (the public code: 1)")
    router: Literal["fit", "representative"] = Field(
        "fit",
        description="representative: router rows = the normalized gate rows of each expert's representative neuron; "
        "fit: the linear map closest (least squares) to the paper's representative-neuron scores on calibration tokens",
    )
    ridge: float = Field(1e-3, ge=0, description="fit: ridge on X^T X, relative to its mean diagonal")


def check_statistics_request(name: str, ffn: DenseFFN, calib: Tensor | None, count: int) -> Tensor:
    """calib as float32, or a one-line RecipeError when `count` neurons cannot be chosen from it."""
    if not 0 <= count <= ffn.d_ff:
        raise RecipeError(f"cannot keep {count} shared neurons out of {ffn.d_ff}; choose between 0 and {ffn.d_ff}")
    rows = 0 if calib is None else calib.shape[0]
    if rows < MIN_TOKENS:
        raise RecipeError(f"{name} needs at least {MIN_TOKENS} calibration tokens for its activation statistics, got "
                          f"{rows}; raise calibration.tokens")
    return calib.float()


def highest(score: Tensor, count: int) -> Tensor:
    """[count] sorted ids of the largest scores; ties go to the lower index, so the choice is reproducible."""
    return torch.argsort(-score, stable=True)[:count].sort().values


def normalized_activations(ffn: DenseFFN, x: Tensor) -> Tensor:
    """CMoE's h on unit-norm inputs and unit-norm weight rows (biases left out).  [T, d] -> [T, d_ff]"""
    act = ACT2FN[ffn.act]
    xn = torch.nn.functional.normalize(x.float(), dim=1)  # [T, d]
    up = xn @ torch.nn.functional.normalize(ffn.up.float(), dim=1).T  # [T, d_ff]
    if ffn.gate is None:
        return act(up)
    return act(xn @ torch.nn.functional.normalize(ffn.gate.float(), dim=1).T) * up


def activation_markers(ffn: DenseFFN, x: Tensor, k_act: int) -> Tensor:
    """[T, d_ff] bool: each token marks the k_act neurons with the largest |normalized activation|."""
    if k_act > ffn.d_ff:
        raise RecipeError(f"cmoe: k_act={k_act} exceeds the {ffn.d_ff} neurons it chooses from; lower k_act")
    marks = torch.zeros(x.shape[0], ffn.d_ff, dtype=torch.bool)
    for start in range(0, x.shape[0], CHUNK):
        top = normalized_activations(ffn, x[start : start + CHUNK]).abs().topk(k_act, dim=1).indices  # [t, K]
        marks[start : start + CHUNK].scatter_(1, top, True)
    return marks


def l1_distances(marks: Tensor, centroids: Tensor) -> Tensor:
    """[n, E] float64 L1 distances between binary neuron patterns marks [T, n] and centroids [T, E] in [0, 1].

    For m in {0, 1}: |m - c| = m + c - 2 m c, so the distance is a matrix product (no [n, E, T] tensor)."""
    cross = torch.zeros(marks.shape[1], centroids.shape[1], dtype=torch.float64)
    for start in range(0, marks.shape[0], CHUNK):
        cross += marks[start : start + CHUNK].double().T @ centroids[start : start + CHUNK]
    return marks.sum(0, dtype=torch.float64)[:, None] + centroids.sum(0)[None, :] - 2 * cross


def cluster_means(marks: Tensor, assignment: Tensor, num_experts: int) -> Tensor:
    """[T, E] float64 mean activation pattern of each expert's neurons."""
    one_hot = torch.nn.functional.one_hot(assignment, num_experts).double()  # [n, E]
    sums = torch.cat([m.double() @ one_hot for m in marks.split(CHUNK)])  # [T, E]
    return sums / one_hot.sum(0)[None, :]


def representative_scores(ffn: DenseFFN, reps: Tensor, x: Tensor) -> Tensor:
    """The paper's router score |norm(W_up[r])·x ⊙ act(norm(W_gate[r])·x)| per representative r.  [T, d] -> [T, E]"""
    up = x @ torch.nn.functional.normalize(ffn.up[reps].float(), dim=1).T  # [T, E]
    if ffn.gate is None:
        return ACT2FN[ffn.act](up).abs()
    return (up * ACT2FN[ffn.act](x @ torch.nn.functional.normalize(ffn.gate[reps].float(), dim=1).T)).abs()


def linear_fit(x: Tensor, target: Tensor, ridge: float) -> Tensor:
    """[E, d] W minimising ||x Wᵀ - target||² + ridge·mean(diag XᵀX)·||W||² (float64 normal equations)."""
    x64, t64 = x.double(), target.double()
    gram = x64.T @ x64  # [d, d]
    gram += ridge * gram.diagonal().mean().clamp_min(1e-30) * torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.linalg.solve(gram, x64.T @ t64).T.float()  # [E, d]


def top_k_agreement(logits: Tensor, reference: Tensor, top_k: int) -> float:
    """Share of the reference's top-k choices that the logits' top-k also makes."""
    mine = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(top_k, dim=1).indices, True)
    ref = torch.zeros_like(reference, dtype=torch.bool).scatter_(1, reference.topk(top_k, dim=1).indices, True)
    return float((mine & ref).sum() / ref.sum())


@register_partitioner("cmoe")
class CMoEPartitioner(Partitioner):
    """Shared neurons = the highest activation rates; routed neurons in equal experts by an exact balanced linear
    assignment on the L1 distance between binary activation patterns; router from one representative neuron per expert.

    Activation rate: each calibration token marks its k_act neurons of largest |h| (h computed on unit-norm inputs and
    weight rows); a neuron's rate is the share of tokens that mark it. The E centroids start at the patterns of the E
    highest-rate routed neurons; each round assigns every neuron to one centroid (n / E per centroid, minimum total L1
    distance: the Jonker-Volgenant problem, solved exactly by balanced.balanced_assignment) and moves the centroids
    to their clusters' means. An expert's representative is its neuron nearest the final centroid. The paper's weights
    are 1 at conversion: use the recipe's `scoring: none`; its load-balancing bias is 0 until fine-tuning.

    Deviations from the paper, forced by the checkpoint format or by the pipeline:
    - Router: the paper scores |norm(W_up[r])·x ⊙ SiLU(norm(W_gate[r])·x)|, which is not linear in x; a moeconv
      checkpoint's router is one Linear(d, E). `router: fit` (default) stores the least-squares linear map to those
      scores on the calibration tokens (training-free, closed form); `representative` stores the normalized gate rows
      (the SiLU term's direction alone). Metric `router_agreement`: share of the paper router's top-k choices kept.
    - Shared size: one `shared_neurons` count for every layer (config.json has one shared_size), set in the recipe;
      the paper's S shared experts are S·d_ff/N neurons: for S2A2E16 on d_ff = 1536, shared_neurons: 192, experts: 14.
    - The clustering's markers are recomputed on the routed neurons (top-k_act among them), where the paper reuses the
      whole layer's markers, in which the shared neurons take most of each token's k_act marks.
    - Every layer is calibrated on the dense model's hidden states (moeconv's LayerRunner), where the paper feeds each
      layer the already-carved previous layers' outputs.
    """

    Config = CMoEConfig
    needs_calibration = True

    def select_shared(self, ffn: DenseFFN, calib: Tensor, count: int) -> tuple[Tensor, dict[str, float]]:
        x = check_statistics_request("cmoe", ffn, calib, count)[: self.config.max_tokens]
        marks = activation_markers(ffn, x, self.config.k_act)  # [T, d_ff]
        rates = marks.float().mean(0)  # [d_ff]
        shared = highest(rates, count)
        return shared, {"marked_fraction": float(rates[shared].sum() / rates.sum())}

    def _partition(
        self, ffn: DenseFFN, num_experts: int, calib: Tensor | None, generator: torch.Generator, top_k: int | None
    ) -> PartitionResult:
        config: CMoEConfig = self.config
        x = check_statistics_request("cmoe", ffn, calib, 0)
        x = subsample_rows(x, config.max_tokens, generator)  # [T, d]
        capacity = ffn.d_ff // num_experts
        marks = activation_markers(ffn, x, config.k_act)  # [T, n]
        rates = marks.float().mean(0)  # [n]
        centroids = marks[:, torch.argsort(-rates, stable=True)[:num_experts]].double()  # [T, E]
        for _ in range(config.iterations):
            assignment = balanced_assignment(l1_distances(marks, centroids), capacity)  # [n]
            centroids = cluster_means(marks, assignment, num_experts)
        distances = l1_distances(marks, centroids)  # [n, E]
        own = distances.gather(1, assignment[:, None])[:, 0]  # [n]
        reps = torch.stack([torch.nonzero(assignment == e)[:, 0][own[assignment == e].argmin()] for e in range(num_experts)])
        scores = representative_scores(ffn, reps, x)  # [T, E]
        if config.router == "fit":
            router = linear_fit(x, scores, config.ridge)
        else:
            rows = ffn.up if ffn.gate is None else ffn.gate
            router = torch.nn.functional.normalize(rows[reps].float(), dim=1)
        metrics = {"mean_l1_to_centroid": float(own.mean() / x.shape[0]), "routed_rate_mean": float(rates.mean())}
        if top_k is not None:
            metrics["router_agreement"] = top_k_agreement(x @ router.T, scores, top_k)
        return PartitionResult(assignment=assignment, router=router, metrics=metrics)
