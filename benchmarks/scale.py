"""Peak memory of `moeconv convert` against depth: same-width synthetic models with 4 and 32 layers.

    python benchmarks/scale.py --layers 4,32 --hidden 1024 --ffn 2816

Each conversion runs in its own process; its peak RSS is read with getrusage(RUSAGE_CHILDREN).
Streaming means the 32-layer run should peak within ~1.3x of the 4-layer run although its
weights are 8x larger.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

PEAK = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def build(folder: Path, layers: int, hidden: int, ffn: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(src: Path, out: Path, experts: int, top_k: int) -> tuple[float, float]:
    """(peak RSS GiB, seconds) of one conversion in a fresh process."""
    cmd = [sys.executable, "-m", "moeconv.cli.app", "convert", str(src), str(out), "--experts", str(experts), "--top-k",
           str(top_k), "--no-router-training", "--no-refit", "--max-shard-size", "200MB", "-q", "--force"]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK, *cmd], check=True, capture_output=True, text=True)
    return int(result.stdout.strip().splitlines()[-1]) / 2**20, time.perf_counter() - start


def run(layers: list[int], hidden: int, ffn: int, experts: int, top_k: int, work: Path) -> list[dict]:
    rows = []
    for n in layers:
        src = work / f"dense-{n}"
        nbytes = build(src, n, hidden, ffn)
        peak, seconds = measure(src, work / f"moe-{n}", experts, top_k)
        rows.append({"layers": n, "weights_gib": nbytes / 2**30, "peak_rss_gib": peak, "seconds": seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,32")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run([int(n) for n in args.layers.split(",")], args.hidden, args.ffn, args.experts, args.top_k, Path(tmp))
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    base = rows[0]["peak_rss_gib"]
    print(f"synthetic llama, hidden {args.hidden}, FFN {args.ffn}, E={args.experts} k={args.top_k}, float32; "
          f"{date.today()}, {platform.machine()}\n")
    print("| layers | weights GiB | peak RSS GiB | ratio to first | seconds |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['weights_gib']:.2f} | {r['peak_rss_gib']:.2f} | {r['peak_rss_gib'] / base:.2f}x | "
              f"{r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
