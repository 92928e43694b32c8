"""How closely each int4 grid reproduces the real SmolLM2's (Q4_1 GGUF) weights: round-to-nearest, no calibration.

    python benchmarks/grid_fit.py [--layers 3]

Prints the relative Frobenius error ||deq(q(W)) - W|| / ||W|| over the seven linears of the chosen layers for
integer and fp16 ("float") zero points at group sizes 32 and 64 (moeconv.quant.grids, the code quantize uses).
"""

from __future__ import annotations

import argparse

from quality import real_model

from moeconv.config import QuantSpec
from moeconv.io.readers import open_checkpoint
from moeconv.quant.grids import dequantize, quantize_rtn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="3", help="comma-separated decoder layer indices")
    args = parser.parse_args()
    reader = open_checkpoint(real_model())
    layers = [f"model.layers.{i}." for i in args.layers.split(",")]
    names = [k for k in reader.keys() if k.endswith("proj.weight") and any(k.startswith(p) for p in layers)]
    weights = [reader.get(k).float() for k in names]
    print(f"SmolLM2-135M-Instruct Q4_1 GGUF, layers {args.layers}: {len(names)} linears, "
          f"{sum(w.numel() for w in weights) / 1e6:.2f}M weights, int4 round-to-nearest\n")
    print("| group | zero points | bits/weight | relative weight error |")
    print("|---:|---|---:|---:|")
    for group in (32, 64):
        for float_zeros in (False, True):
            spec = QuantSpec(4, group, float_zeros=float_zeros)
            err = sum(float((dequantize(quantize_rtn(w, spec)) - w).square().sum()) for w in weights)
            total = sum(float(w.square().sum()) for w in weights)
            bits = 4 + (32 if float_zeros else 20) / group  # fp16 scale + fp16 or 4-bit zero per group
            print(f"| {group} | {'fp16' if float_zeros else 'int4'} | {bits:.3f} | {(err / total) ** 0.5:.5f} |")


if __name__ == "__main__":
    main()
