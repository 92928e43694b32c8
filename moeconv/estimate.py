"""What one layer of `convert` costs before it runs: peak memory by part, and floating-point work by stage.

Memory (bytes, CPU): what every layer holds (the calibration hidden states and captured FFN inputs, the layer's FFN
as read) plus the largest step (see layer_memory), or embedding the calibration windows where that is larger (the
base model's non-layer weights in float32 and the load of the largest; they are released once the windows are
embedded). The constants were fitted to per-step peaks (VmHWM) of a 2-layer Llama-3-8B-shaped conversion at 4096
tokens; the refit's accumulator and factors follow moeconv.refit (rows [T, N + d] and T x T matrices when T < N, else
the N x N Gram matrix and a factor, in float64 where auto widens). The work per layer counts the matrix
products of capture, partition, router and refit; seconds = work / a FLOP rate measured on the device (an estimate:
elementwise work, the optimizer steps and I/O are not counted).
"""

from __future__ import annotations

import math
import time

import torch

from moeconv.config import ConvertRecipe

# Bytes a Python process running torch and transformers holds before it loads anything (measured 0.36-0.40 GiB).
BASE_BYTES = 400 * 2**20
# Token x neuron float32 arrays alive at once while a stage computes gated activations (gate, act, up, product).
ACTIVATION_ARRAYS = 4
# Loading a non-layer tensor holds its float32 copy plus the source bytes read (and mapped) on the way:
# measured 1.5x its float32 size on top of what is already held (the 8B embedding, bf16 safetensors).
LOAD_TRANSIENT = 1.5
CAPTURE_BATCH = 8  # windows per LayerRunner forward


def weight_sizes(reader, layer_prefix: str) -> tuple[int, int, int]:
    """(parameters of the base model outside the decoder layers, the largest of them, parameters of decoder
    layer 0) from the reader's shapes. The LM head is not counted: capture runs the base model only."""
    outside = largest = layer0 = 0
    base = layer_prefix.split(".")[0] + "."
    for name in reader.keys():
        numel = math.prod(reader.shape(name))
        if name.startswith(base) and not name.startswith(layer_prefix + "."):
            outside += numel
            largest = max(largest, numel)
        elif name.startswith(f"{layer_prefix}.0."):
            layer0 += numel
    return outside, largest, layer0


def layer_memory(recipe: ConvertRecipe, tokens: int, d: int, d_ff: int, sizes: tuple[int, int, int], ffn_source_bytes: int,
                 layer_out_bytes: int, output_global_bytes: int) -> dict[str, int]:
    """Peak bytes by part with `tokens` calibration tokens (0: no calibration); the parts sum to the peak.

    What every layer holds (process, calibration states, the layer's FFN as read) plus the
    largest of what the steps hold one after another: loading the embeddings, capture (the decoder layer in
    float32 and a batch's FFN activations), partition/router ([T, d_ff] activations), refit (its float32 FFN,
    accumulator, factors and a chunk's activations), writing (the MoE block and the output tensors)."""
    outside, largest, layer = sizes
    ffn32 = 3 * d * d_ff * 4
    parts = {"process": BASE_BYTES}
    if not tokens:
        parts.update({"embeddings/head (output dtype)": output_global_bytes, "FFN (float32) and its experts": 2 * ffn32,
                      "layer output": layer_out_bytes})
        return parts
    # dense stream, its FFN inputs, the next states; converted inputs add that stream and the gap to the dense one
    states = 5 if recipe.calibration.inputs == "converted" else 3
    parts.update({"calibration states": states * tokens * d * 4, "FFN as read": ffn_source_bytes})
    steps = {"capture (layer float32 + activations)": layer * 4 + 3 * min(tokens, CAPTURE_BATCH * recipe.calibration.seqlen) * d_ff * 4,
             "partition/router activations": ffn32 + ACTIVATION_ARRAYS * tokens * d_ff * 4,
             "write (MoE block + output)": ffn32 + 2 * layer_out_bytes}
    if recipe.refits:
        held = max(1, round(tokens * recipe.refit.holdout_fraction))
        train = tokens - held
        item = 8 if recipe.refit.precision == "float64" else 4
        # a factorization holds the matrix and its factor; "auto" may factor a candidate in float64 from a float64 copy
        factoring = {"float32": 8, "float64": 16, "auto": 20}[recipe.refit.precision]
        chunk = ACTIVATION_ARRAYS * min(tokens, recipe.refit.chunk) * d_ff * 4
        if train < d_ff:  # dual form: rows, targets and residuals kept; kernel and factor (rows in float64 when widened)
            rows = train * (d_ff + 2 * d) * item
            accumulate, factorize = rows + chunk, rows + factoring * train * train + (train * d_ff * 8 if recipe.refit.precision == "auto" else 0)
        else:  # Gram form: Gram matrix and cross products; then the Gram matrix and a factor
            cross = d_ff * d * item
            accumulate, factorize = d_ff * d_ff * item + cross + chunk, factoring * d_ff * d_ff + cross
            # the solves: Gram, factor and the copy of it torch.cholesky_solve makes, right-hand side and solution
            wide = 4 if recipe.refit.precision == "float32" else 8
            factorize = max(factorize, d_ff * d_ff * (item + 2 * wide) + 2 * cross + 2 * d_ff * d * wide)
        steps["refit"] = ffn32 + held * (d_ff + d) * 4 + max(accumulate, factorize)  # the two phases follow each other
    step = max(steps, key=steps.get)  # the steps run one after another: only the largest counts
    parts[step] = steps[step]
    loading = LOAD_TRANSIENT * largest * 4
    if outside * 4 + loading > sum(parts.values()) - BASE_BYTES:  # the peak is while the windows are embedded
        parts = {"process": BASE_BYTES, "embeddings (float32)": outside * 4, "loading the embeddings": int(loading)}
    return parts


def layer_flops(recipe: ConvertRecipe, tokens: int, d: int, d_ff: int, layer: int, seqlen: int,
                partition_work: float) -> dict[str, float]:
    """Floating-point operations per layer by stage (matrix products only); partition_work: the partitioner's own
    count (Partitioner.work)."""
    if not tokens:
        return {}
    passes = 3 if recipe.calibration.inputs == "converted" else 1  # dense stream, converted stream, and its advance
    flops = {"capture": passes * (2 * layer * tokens + 2 * tokens * seqlen * d)}
    if partition_work:
        flops["partition"] = partition_work
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
    n = 2048 if device.type == "cpu" else 8192
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
