"""Times moeconv's fused MoE FFN against the dense FFN, a naive per-expert loop and torch._grouped_mm.

    python benchmarks/kernel_speed.py                 # markdown table, CPU (and CUDA when present)
    python benchmarks/kernel_speed.py --json          # the same rows as JSON
    python benchmarks/kernel_speed.py --quick         # SmolLM2 shapes only, T <= 64
    python benchmarks/kernel_speed.py --threads 1     # on a crowded machine: 2-thread OpenMP GEMMs stall
    MOECONV_CPU_ISA=avx512 python benchmarks/kernel_speed.py   # force a lower CPU kernel path to compare
    python benchmarks/kernel_speed.py --device cuda --dtype bfloat16 --tokens 1,512,4096   # the GPU check's rows
    python benchmarks/kernel_speed.py --quant [options]  # quantized linear kernels vs fp32/bf16 GEMV: quant_kernel_speed.py

Every row is measured in one run: best wall time of repeated calls after a warm-up.
ratios are baseline_time / moe_ffn_time (above 1: moe_ffn is faster).  The MoE weights are the
dense FFN's neurons split evenly into E experts, so "dense" is the same total width.  On CUDA the
header also gives the device-to-device copy bandwidth (bytes read + written), the memory ceiling.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import moeconv.kernels as K
from moeconv.kernels import native, reference

# (label, d_model, d_ff, experts, top_k)
SHAPES = [
    ("smollm2", 576, 1536, 8, 2),
    ("smollm2", 576, 1536, 8, 4),
    ("smollm2", 576, 1536, 16, 2),
    ("smollm2", 576, 1536, 16, 4),
    ("7b", 4096, 14336, 8, 2),
    ("7b", 4096, 14336, 64, 8),
]
TOKENS = [1, 8, 64, 512, 4096]


@dataclass
class Row:
    device: str
    dtype: str
    shape: str
    T: int
    dense_ms: float | None
    moe_ffn_ms: float | None
    naive_ms: float | None
    grouped_mm_ms: float | None
    note: str = ""

    def ratio(self, baseline: float | None) -> str:
        if baseline is None or self.moe_ffn_ms is None:
            return "-"
        return f"{baseline / self.moe_ffn_ms:.2f}x"


def timed(fn, device: torch.device, budget_s: float) -> float:
    """Best (minimum) milliseconds per call over enough calls to fill ~budget_s (at least 3).

    The minimum, not the median: on a shared machine other processes only ever add time.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    reps = max(3, min(200, int(budget_s / max(first, 1e-6))))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return 1e3 * min(samples)


def grouped_mm_ffn(x, ids, weights, w_gate, w_up, w_down):
    """Stock alternative: sort pairs by expert, gather, torch._grouped_mm x3, weighted index_add."""
    T, k = ids.shape
    flat = ids.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)  # [T*k]
    counts = torch.bincount(flat, minlength=w_up.shape[0])  # [E]
    offs = torch.cumsum(counts, 0).to(torch.int32)  # [E]
    tokens = order // k  # [T*k]
    xs = x.index_select(0, tokens)  # [P, d]
    gate = torch._grouped_mm(xs, w_gate.transpose(1, 2), offs=offs)  # [P, s]
    up = torch._grouped_mm(xs, w_up.transpose(1, 2), offs=offs)  # [P, s]
    ys = torch._grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offs)  # [P, d]
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, tokens, ys.float() * weights.reshape(-1)[order, None].float())
    return out.to(x.dtype)


def bench_shape(device, dtype, label, d, d_ff, E, k, T, budget_s, skip_naive_above, gen) -> Row:
    s = d_ff // E
    scale = d**-0.5
    w_gate = (torch.randn(d_ff, d, generator=gen) * scale).to(device, dtype)  # [d_ff, d]
    w_up = (torch.randn(d_ff, d, generator=gen) * scale).to(device, dtype)  # [d_ff, d]
    w_down = (torch.randn(d, d_ff, generator=gen) * d_ff**-0.5).to(device, dtype)  # [d, d_ff]
    # Experts own contiguous neuron blocks (a converted model stores them permuted, same bytes).
    eg = w_gate.view(E, s, d).clone()  # [E, s, d]
    eu = w_up.view(E, s, d).clone()  # [E, s, d]
    ed = w_down.view(d, E, s).permute(1, 0, 2).contiguous()  # [E, d, s]
    x = torch.randn(T, d, generator=gen).to(device, dtype)  # [T, d]
    logits = torch.randn(T, E, generator=gen).to(device)  # [T, E]
    ids, weights = K.route(logits, k, "none")
    weights = weights.to(dtype)

    def dense():
        return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)

    def moe():
        return K.moe_ffn(x, ids, weights, eu, ed, w_gate=eg)

    def naive():
        return reference.moe_ffn(x, ids, weights, eg, eu, ed, "silu")

    def grouped():
        return grouped_mm_ffn(x, ids, weights, eg, eu, ed)

    shape = f"{label} d={d} ff={d_ff} E={E} k={k}"
    note = []
    row = Row(device.type, str(dtype).removeprefix("torch."), shape, T, None, None, None, None)
    row.dense_ms = timed(dense, device, budget_s)
    row.moe_ffn_ms = timed(moe, device, budget_s)
    if T * d * d_ff <= skip_naive_above:
        row.naive_ms = timed(naive, device, budget_s)
    else:
        note.append("naive skipped (slow)")
    if hasattr(torch, "_grouped_mm"):
        try:
            row.grouped_mm_ms = timed(grouped, device, budget_s)
        except (RuntimeError, NotImplementedError) as exc:
            note.append(f"grouped_mm: {str(exc).splitlines()[0][:40]}")
    row.note = "; ".join(note)
    return row


def copy_bandwidth_gb_s(device: torch.device, budget_s: float) -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus bytes written (the bandwidth ceiling)."""
    src = torch.randn(2**28, device=device)  # [2^28] float32 = 1 GiB, random: zeros can run faster
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), device, budget_s)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def markdown(rows: list[Row]) -> str:
    lines = [
        "| device | dtype | shape | T | dense ms | moe_ffn ms | vs dense | naive ms | vs naive | grouped_mm ms | vs grouped | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for r in rows:
        lines.append(
            f"| {r.device} | {r.dtype} | {r.shape} | {r.T} | {fmt(r.dense_ms)} | {fmt(r.moe_ffn_ms)} | "
            f"{r.ratio(r.dense_ms)} | {fmt(r.naive_ms)} | {r.ratio(r.naive_ms)} | {fmt(r.grouped_mm_ms)} | "
            f"{r.ratio(r.grouped_mm_ms)} | {r.note} |"
        )
    return "\n".join(lines)


def token_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The command line (benchmarks/gpu_check.py validates its planned arguments against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a markdown table")
    parser.add_argument("--quick", action="store_true", help="SmolLM2 shapes and T <= 64 only")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "all"], default="all")
    parser.add_argument("--budget", type=float, default=0.25, help="seconds of timing per measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--cpu-max-7b-tokens", type=int, default=512, help="skip 7B shapes above this T on CPU")
    parser.add_argument("--tokens", type=token_list, default=TOKENS, help="comma-separated T values (default: %(default)s)")
    return parser


def main() -> None:
    if "--quant" in sys.argv[1:]:  # the quantized kernels' rows, with their own options
        from quant_kernel_speed import main as quant_main  # the sibling script (benchmarks/ is sys.path[0] when run)

        quant_main([a for a in sys.argv[1:] if a != "--quant"])
        return
    args = build_parser().parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    dtypes = [torch.float32, torch.bfloat16] if args.dtype == "all" else [getattr(torch, args.dtype)]
    gen = torch.Generator().manual_seed(0)
    rows: list[Row] = []
    for device in devices:
        for dtype in dtypes:
            for label, d, d_ff, E, k in SHAPES:
                if args.quick and label != "smollm2":
                    continue
                for T in args.tokens:
                    if args.quick and T > 64:
                        continue
                    if device.type == "cpu" and label == "7b" and T > args.cpu_max_7b_tokens:
                        shape = f"{label} d={d} ff={d_ff} E={E} k={k}"
                        rows.append(
                            Row(
                                device.type,
                                str(dtype).removeprefix("torch."),
                                shape,
                                T,
                                None,
                                None,
                                None,
                                None,
                                f"skipped on CPU (T > {args.cpu_max_7b_tokens}; see --cpu-max-7b-tokens)",
                            )
                        )
                        continue
                    skip_naive = 4096 * 576 * 1536 if device.type == "cpu" else float("inf")
                    rows.append(bench_shape(device, dtype, label, d, d_ff, E, k, T, args.budget, skip_naive, gen))
    header = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "kernels": K.kernel_status()["moe_ffn"],
        "cpu_isa": native.cpu_isa(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if any(device.type == "cuda" for device in devices):
        header["gpu"] = torch.cuda.get_device_name()
        header["copy_gb_s"] = round(copy_bandwidth_gb_s(torch.device("cuda"), args.budget), 1)
    if args.json:
        print(json.dumps({"meta": header, "rows": [asdict(r) for r in rows]}, indent=1))
    else:
        print(" | ".join(f"{key}: {value}" for key, value in header.items()))
        print()
        print(markdown(rows))


if __name__ == "__main__":
    main()
