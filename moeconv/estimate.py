"""What one layer of `convert` costs before it runs: peak memory by part, and floating-point work by stage.

Memory (bytes, CPU): the non-layer weights of the base model LayerRunner holds in float32 (embeddings, final norm), the
calibration hidden states and captured FFN inputs, one decoder layer in float32 plus the FFN copies the stages
make (the dense FFN read again, the MoE block's experts), the largest token x neuron activations a stage holds,
the refit's accumulator and factors (moeconv.refit: rows [T, N + d] and T x T matrices when T < N, else N x N
Gram matrix, factor and best factor), and the layer's output tensors. The work per layer counts the matrix
products of capture, partition, router and refit; seconds = work / a FLOP rate measured on the device (an estimate:
elementwise work, the optimizer steps and I/O are not counted).
"""

from __future__ import annotations

import math
import time

import torch

from moeconv.config import ConvertRecipe

# Bytes a Python process running torch and transformers holds before it loads anything (measured ~0.45 GiB).
BASE_BYTES = 480 * 2**20
# Token x neuron float32 arrays alive at once while a stage computes gated activations (gate, act, up, product).
ACTIVATION_ARRAYS = 4


def weight_sizes(reader, layer_prefix: str) -> tuple[int, int]:
    """(parameters of the base model outside the decoder layers, parameters of decoder layer 0) from the reader's
    shapes. The LM head is not counted: capture runs the base model only."""
    outside = layer0 = 0
    base = layer_prefix.split(".")[0] + "."
    for name in reader.keys():
        numel = math.prod(reader.shape(name))
        if name.startswith(base) and not name.startswith(layer_prefix + "."):
            outside += numel
        elif name.startswith(f"{layer_prefix}.0."):
            layer0 += numel
    return outside, layer0


def layer_memory(recipe: ConvertRecipe, tokens: int, d: int, d_ff: int, outside: int, layer: int, layer_out_bytes: int,
                 output_global_bytes: int) -> dict[str, int]:
    """Peak bytes by part for one layer with `tokens` calibration tokens (0: no calibration)."""
    gated_ffn = 3 * d * d_ff * 4
    parts = {"process": BASE_BYTES, "layer (float32) + FFN copies": layer * 4 + 2 * gated_ffn, "layer output": layer_out_bytes}
    if not tokens:
        parts["embeddings/head (output dtype)"] = output_global_bytes
        return parts
    parts["embeddings (float32)"] = outside * 4
    parts["calibration states"] = 3 * tokens * d * 4  # hidden states in, captured FFN inputs (list + concatenated)
    stages = {"partition/router activations": ACTIVATION_ARRAYS * tokens * d_ff * 4}  # [T, d_ff] arrays, all tokens at once
    if recipe.refits:
        held = max(1, round(tokens * recipe.refit.holdout_fraction))
        train = tokens - held
        wide = 8 if recipe.refit.precision == "float64" else 4
        if train < d_ff:  # dual form: rows, targets, residual; kernel, factor, best factor
            solve = train * (d_ff + 2 * d) * wide + 3 * train * train * wide
        else:  # Gram form: Gram, factor, best factor, cross
            solve = 3 * d_ff * d_ff * wide + d_ff * d * wide
        stages["refit"] = solve + held * (d_ff + d) * 4 + ACTIVATION_ARRAYS * min(tokens, recipe.refit.chunk) * d_ff * 4
    largest = max(stages, key=stages.get)  # the stages run one after another: only the largest counts
    parts[largest] = stages[largest]
    return parts


def layer_flops(recipe: ConvertRecipe, tokens: int, d: int, d_ff: int, layer: int, seqlen: int) -> dict[str, float]:
    """Floating-point operations per layer by stage (matrix products only)."""
    if not tokens:
        return {}
    ffn_forward = 6 * tokens * d * d_ff  # gate, up, down
    flops = {"capture": 2 * layer * tokens + 2 * tokens * seqlen * d}
    flops["partition"] = ffn_forward * min(1.0, 16384 / tokens)  # one activation pass; the methods' iterations vary
    if recipe.trains_router:
        flops["router"] = 4 * tokens * d * d_ff + 6 * recipe.router.steps * min(recipe.router.batch, tokens) * d * recipe.experts
    if recipe.refits:
        held = max(1, round(tokens * recipe.refit.holdout_fraction))
        t, n, damps = tokens - held, d_ff, len(recipe.refit.damp)
        common = 6 * tokens * d * n  # activations and dense targets of every row
        if t < n:
            solve = 2 * t * n * d + 2 * t * t * n + 2 * held * t * n + damps * (t**3 / 3 + 2 * t * t * held + 2 * held * t * d) \
                + 2 * t * t * d + 2 * t * n * d
        else:
            solve = 2 * t * n * n + 2 * t * n * d + damps * (n**3 / 3 + 2 * n * n * held) + 2 * n * n * d
        flops["refit"] = common + solve
    return flops


def measured_flop_rate(device: torch.device, seconds: float = 0.3) -> float:
    """float32 matrix-product FLOP/s on `device`, from square products for about `seconds`."""
    n = 1024 if device.type == "cpu" else 4096
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    done, start = 0, time.perf_counter()
    while True:
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        done += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * n**3 * done / elapsed
