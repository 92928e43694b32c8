"""Forward-time overhead of the DAG-MoE aggregator over the plain MoE block, and its parameter share.

    python benchmarks/dag_overhead.py                      # markdown table, CPU 1 and 2 threads (+ CUDA when present)
    python benchmarks/dag_overhead.py --threads 1 --json   # the same rows as JSON
    python benchmarks/dag_overhead.py --tokens 1,64 --budget 0.5

Every row comes from one run.  The plain block and the block with an aggregator are timed
interleaved (plain, dag, slots, aggregator, plain, ...) and each keeps its best (minimum) time.
Clock: with one CPU thread, the process's CPU time (time.process_time) by default, because on a
machine shared with other jobs the wall-time minimum of a 50-100 ms call is still off by ±20%
(preemption); with more threads or on CUDA, wall time.  --clock wall forces wall time.  Columns:
plain = MoeconvMoeBlock.forward without aggregator (the fused kernel's sum where it is built);
dag = the same block with a DAG aggregator (per-slot expert outputs + aggregator); slots = the
per-slot expert outputs alone; agg = the aggregator alone on precomputed slots.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

from moeconv.config import DagConfig
from moeconv.dag import attach_dag
from moeconv.kernels import kernel_status
from moeconv.modeling.hf.moe_block import MoeconvMoeBlock

SHAPES = [(8, 2), (8, 4), (16, 4)]  # (experts, top_k) of SmolLM2-135M's FFN, d = 576, d_ff = 1536
D_MODEL, D_FF = 576, 1536


@dataclass
class Row:
    device: str
    threads: int
    clock: str
    experts: int
    top_k: int
    tokens: int
    plain_ms: float
    dag_ms: float
    slots_ms: float
    aggregator_ms: float
    dag_param_share: float

    @property
    def overhead(self) -> float:
        return self.dag_ms / self.plain_ms - 1


def make_block(experts: int, top_k: int, config: DagConfig, device: torch.device) -> MoeconvMoeBlock:
    """A SmolLM2-shaped MoE block with random weights and an aggregator whose W_up is non-zero (as after training)."""
    g = torch.Generator().manual_seed(0)
    moe = {"num_experts": experts, "top_k": top_k, "expert_size": D_FF // experts, "activation": "silu",
           "scoring": "softmax", "renormalize": True}
    block = MoeconvMoeBlock(D_MODEL, moe)
    attach_dag(block, config, g)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return block.to(device).eval()


def interleaved_best(fns: list, device: torch.device, budget_s: float, min_calls: int = 5, clock=time.perf_counter) -> list[float]:
    """Best milliseconds per call of each function (by `clock`), calling them in turn until budget_s of wall time has passed."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns:  # warm-up: kernel loading, caches, allocator
        fn()
        fn()
    best = [float("inf")] * len(fns)
    start, calls = time.perf_counter(), 0
    while calls < min_calls or time.perf_counter() - start < budget_s:
        for i, fn in enumerate(fns):
            sync()
            t0 = clock()
            fn()
            sync()
            best[i] = min(best[i], (clock() - t0) * 1e3)
        calls += 1
    return best


def timings(block: MoeconvMoeBlock, x: torch.Tensor, budget_s: float, clock) -> list[float]:
    """Best ms of: the block without its aggregator, with it, its per-slot expert outputs, the aggregator alone."""
    dag = block.dag
    ids, weights = block.route(x)
    slots = block.routed_outputs(x, ids, weights)

    def plain() -> torch.Tensor:
        block.dag = None
        try:
            return block(x)
        finally:
            block.dag = dag

    fns = [plain, lambda: block(x), lambda: block.routed_outputs(x, ids, weights), lambda: dag(slots, x)]
    return interleaved_best(fns, x.device, budget_s, clock=clock)


@torch.no_grad()
def measure(
    device: torch.device, threads: int, tokens: list[int], config: DagConfig, budget_s: float, clock_name: str
) -> list[Row]:
    torch.set_num_threads(threads)
    if clock_name == "auto":
        clock_name = "cpu" if device.type == "cpu" and threads == 1 else "wall"
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    rows = []
    for experts, top_k in SHAPES:
        block = make_block(experts, top_k, config, device)
        share = sum(p.numel() for p in block.dag.parameters()) / sum(
            p.numel() for name, p in block.named_parameters() if not name.startswith("dag.")
        )
        for t in tokens:
            x = torch.randn(t, D_MODEL, generator=torch.Generator().manual_seed(t)).to(device)
            plain_ms, dag_ms, slots_ms, agg_ms = timings(block, x, budget_s, clock)
            rows.append(Row(device.type, threads, clock_name, experts, top_k, t, plain_ms, dag_ms, slots_ms, agg_ms, share))
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| device | threads | clock | E | k | T | plain ms | dag ms | overhead | slots ms | aggregator ms | dag params |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.device} | {r.threads} | {r.clock} | {r.experts} | {r.top_k} | {r.tokens} | {r.plain_ms:.3f} | {r.dag_ms:.3f} | "
            f"{r.overhead * 100:+.0f}% | {r.slots_ms:.3f} | {r.aggregator_ms:.3f} | {r.dag_param_share * 100:.2f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="CPU thread counts, comma-separated")
    parser.add_argument("--tokens", default="1,64,2048", help="tokens per forward, comma-separated")
    parser.add_argument("--d-g", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of interleaved calls per row")
    parser.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                        help="auto: process CPU time for one CPU thread, wall time otherwise")
    parser.add_argument("--no-cuda", action="store_true", help="CPU only even when a GPU is present")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    config = DagConfig(d_g=args.d_g, rounds=args.rounds)
    tokens = [int(t) for t in args.tokens.split(",")]
    load_before = os.getloadavg()
    rows = []
    for threads in (int(n) for n in args.threads.split(",")):
        rows += measure(torch.device("cpu"), threads, tokens, config, args.budget, args.clock)
    if torch.cuda.is_available() and not args.no_cuda:
        rows += measure(torch.device("cuda"), torch.get_num_threads(), tokens, config, args.budget, "wall")
    load_after = os.getloadavg()

    if args.json:
        print(json.dumps([asdict(r) | {"overhead": r.overhead} for r in rows], indent=1))
        return
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() and not args.no_cuda else ""
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}; "
          f"d={D_MODEL} d_ff={D_FF} d_g={args.d_g} rounds={args.rounds} float32")
    print(f"kernels: {kernel_status()['moe_ffn']}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    print(markdown(rows))


if __name__ == "__main__":
    main()
