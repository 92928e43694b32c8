"""Times the quantized linear kernels (moeconv::quant_linear / ternary_linear / sub1_linear) against the dense
float32 and bfloat16 GEMV/GEMM of the same shape, with the effective bandwidth over the compressed bytes against a
measured memcpy bandwidth. Also reached as `python benchmarks/kernel_speed.py --quant`.

    python benchmarks/quant_kernel_speed.py                          # both shapes, 1 and 2 threads, T = 1 and 16
    python benchmarks/quant_kernel_speed.py --shapes smollm2 --formats int4,ternary
    MOECONV_CPU_ISA=avx2 python benchmarks/quant_kernel_speed.py     # a lower vector path

Shapes are W [out, in]: SmolLM2's 576x1536 and a 7B model's 4096x14336 (the down projections). Codes are uniform
random (intN) or ternary symbols with 85 % zeros (ternary; sub1 is those symbols dictionary-coded, about 0.84 bits
per weight at 32 rows per block), so the timings do not depend on a checkpoint. Every row is the best wall time of
repeated calls after a warm-up, all in one run. "GB/s" is the bytes the kernel must read (packed weights, scales,
zeros, lo/hi, sub1 codes and block offsets; not x or the shared sub1 dictionary) over its time; "copy" is the same for
a memcpy of a 1 GiB buffer (bytes read over time), so "% copy" says how close to the memory it runs.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from moeconv.kernels import native, quant_ops  # noqa: F401 - registers the ops
from moeconv.modeling.hf.quant_linear import build_sub1_table
from moeconv.quant import sub1
from moeconv.quant.packing import pack_bits

SHAPES = {"smollm2": (576, 1536), "7b": (4096, 14336)}  # (out, in)
FORMATS = ("int8", "int4", "int4-fz", "int3", "int2", "ternary", "sub1")
GROUP = 64  # intN group size (int4-fz: float zero points, group 32, the layout of GGUF's Q4_1)


def best_ms(fn, budget_s: float) -> float:
    fn()
    best, spent, n = float("inf"), 0.0, 0
    while spent < budget_s or n < 3:
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent, n = min(best, took), spent + took, n + 1
    return best * 1e3


def copy_gb_s(budget_s: float) -> float:
    """Bytes read per second by a memcpy of 1 GiB (torch's copy_, this process's threads)."""
    src = torch.randn(2**28)
    dst = torch.empty_like(src)
    return src.numel() * 4 / (best_ms(lambda: dst.copy_(src), budget_s) * 1e-3) / 1e9


def make_case(fmt: str, out: int, cols: int, gen: torch.Generator) -> tuple[callable, int]:
    """(call(x) -> y, bytes the kernel reads) for a random matrix in `fmt`."""
    if fmt in ("ternary", "sub1"):
        symbols = torch.multinomial(torch.tensor([0.85, 0.075, 0.075]), out * cols, replacement=True, generator=gen)
        symbols = symbols.reshape(out, cols).to(torch.uint8)
        lo_hi = torch.stack([-torch.rand(out, generator=gen), torch.rand(out, generator=gen)], 1)  # decoded log8 lo/hi
        lo_hi_bytes = out * 2 + 8  # stored: 8-bit codes per row + the tensor's range
        if fmt == "ternary":
            q = pack_bits(symbols, 2)
            return (lambda x: torch.ops.moeconv.ternary_linear(x, q, lo_hi, None)), q.numel() + lo_hi_bytes
        table = build_sub1_table(sub1.pair_counts(symbols))
        codes, offsets = sub1.encode(symbols, sub1.Sub1Dictionary(table), 32)
        read = codes.numel() * 2 + offsets.numel() * 4 + lo_hi_bytes
        return (lambda x: torch.ops.moeconv.sub1_linear(x, codes, offsets, table, lo_hi, None, 32)), read
    bits = int(fmt[3])
    group = 32 if fmt == "int4-fz" else GROUP
    n_groups = cols // group
    q = pack_bits(torch.randint(0, 2**bits, (out, cols), dtype=torch.uint8, generator=gen), bits)
    scales = (torch.rand(out, n_groups, generator=gen) * 0.01).half()
    if fmt == "int4-fz":
        zeros = (torch.rand(out, n_groups, generator=gen) * 15).half()
    else:
        zeros = pack_bits(torch.randint(0, 2**bits, (out, n_groups), dtype=torch.uint8, generator=gen), bits)
    read = q.numel() + scales.numel() * 2 + zeros.numel() * zeros.element_size()
    return (lambda x: torch.ops.moeconv.quant_linear(x, q, scales, zeros, None, bits, group)), read


def run(shapes: list[str], formats: list[str], threads: list[int], tokens: list[int], budget_s: float) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    lines = [
        "| shape | threads | T | format | bits/w | MB read | ms | fp32 ms | vs fp32 | bf16 ms | vs bf16 | GB/s | % copy |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    copies = {}
    for n in threads:
        torch.set_num_threads(n)
        copies[n] = copy_gb_s(budget_s)
    for shape in shapes:
        out, cols = SHAPES[shape]
        w32 = torch.randn(out, cols, generator=gen) * 0.02
        w16 = w32.bfloat16()
        cases = {fmt: make_case(fmt, out, cols, gen) for fmt in formats}
        for n in threads:
            torch.set_num_threads(n)
            for T in tokens:
                x = torch.randn(T, cols, generator=gen)
                x16 = x.bfloat16()
                fp32 = best_ms(lambda x=x, w=w32: F.linear(x, w), budget_s)
                bf16 = best_ms(lambda x=x16, w=w16: F.linear(x, w), budget_s)
                for fmt, (call, read) in cases.items():
                    ms = best_ms(lambda x=x, call=call: call(x), budget_s)
                    gb_s = read / (ms * 1e-3) / 1e9
                    lines.append(
                        f"| {shape} {out}x{cols} | {n} | {T} | {fmt} | {read * 8 / (out * cols):.2f} | {read / 1e6:.1f} | "
                        f"{ms:.3f} | {fp32:.3f} | {fp32 / ms:.2f}x | {bf16:.3f} | {bf16 / ms:.2f}x | {gb_s:.1f} | "
                        f"{100 * gb_s / copies[n]:.0f} % |")
        del w32, w16, cases
    header = ["copy bandwidth (bytes read / s, 1 GiB memcpy): "
              + ", ".join(f"{n} thread{'s' if n > 1 else ''}: {gb:.1f} GB/s" for n, gb in copies.items())]
    return header + [""] + lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: %(default)s")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated: %(default)s")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--tokens", default="1,16", help="comma-separated T values")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timing per measurement")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    split = lambda text: [t for t in text.split(",") if t.strip()]  # noqa: E731
    isa = native.cpu_isa() or "not built (PyTorch reference)"
    print(f"# quantized linear kernels: CPU path {isa}; {platform.processor() or platform.machine()}; torch {torch.__version__}")
    print(f"date {time.strftime('%Y-%m-%d')}\n")
    lines = run(split(args.shapes), split(args.formats), [int(t) for t in split(args.threads)],
                [int(t) for t in split(args.tokens)], args.budget)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
