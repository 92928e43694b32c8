"""Cost of the refit stage at 8B width: the converter's own path (moeconv.refit.refit_down) on one layer.

    OMP_NUM_THREADS=2 python benchmarks/refit_scale.py                       # d 4096, d_ff 14336, 4096 tokens
    OMP_NUM_THREADS=2 python benchmarks/refit_scale.py --reference           # + the float64 reference, compared
    OMP_NUM_THREADS=2 python benchmarks/refit_scale.py --factor-size 4096    # Cholesky vs eigh at one size

The layer is a SiLU-gated random FFN whose inputs have a decaying spectrum (per-dimension scale j^-1/2),
routed top-k of E by a random router: its gated activations give a Gram matrix with the spread of
eigenvalues of a real one. Prints seconds (wall, and CPU seconds of the process: on a shared machine the
wall time depends on the other load) for the whole refit (activations, accumulation, the ridge
solves over every damp), the solve alone, peak memory, and with --reference the float64 per-damp
reference (the implementation before the dual/float32 solve): damp picked, relative difference of the
fitted weights (to the reference's weights and to its correction W - W0) and of the held-out error.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

import moeconv.refit as refit
from moeconv.config import RefitConfig
from moeconv.ffn import DenseFFN
from moeconv.modeling.hf.moe_block import route


def layer(d: int, d_ff: int, tokens: int, experts: int, top_k: int, seed: int, device: torch.device):
    g = torch.Generator().manual_seed(seed)
    ffn = DenseFFN(up=torch.randn(d_ff, d, generator=g) / d**0.5, down=torch.randn(d, d_ff, generator=g) / d_ff**0.5,
                   act="silu", gate=torch.randn(d_ff, d, generator=g) / d**0.5)
    scale = (torch.arange(d) + 1.0) ** -0.5
    x = torch.randn(tokens, d, generator=g) * (scale * d**0.5 / scale.norm())
    router = torch.randn(experts, d, generator=g).to(device)
    order = torch.randperm(d_ff, generator=g)

    def gates(h: torch.Tensor) -> torch.Tensor:
        ids, weights = route(h @ router.T, top_k, "none", False)
        return refit.neuron_gates(ids, weights, d_ff // experts, experts, 0)

    return ffn, order, gates, x


def reference(ffn, order, gates, x, config: RefitConfig) -> tuple[torch.Tensor, dict]:
    """The float64 implementation this replaced: Gram accumulated in float64, one full solve per damp."""
    split = x.shape[0] - max(1, round(x.shape[0] * config.holdout_fraction))
    sub = ffn.select(order)
    w0 = sub.down.double()
    gram = torch.zeros(w0.shape[1], w0.shape[1], dtype=torch.float64)
    cross = torch.zeros(w0.shape[1], w0.shape[0], dtype=torch.float64)
    held_x, held_y = [], []
    for rows in torch.arange(x.shape[0]).split(config.chunk):
        h = sub.intermediate(x[rows])
        xs, ys = (h * gates(x[rows])).double(), (h @ sub.down.T).double()
        train = rows < split
        gram += xs[train].T @ xs[train]
        cross += xs[train].T @ ys[train]
        held_x.append(xs[~train].float())
        held_y.append(ys[~train].float())
    hx, hy = torch.cat(held_x), torch.cat(held_y)

    def error(w):
        return float((hy - hx @ w.float().T).norm() / hy.norm())

    best, best_error, best_damp = w0, error(w0), 0.0
    before = best_error
    for damp in config.damp:
        lam = damp * float(gram.diagonal().mean())
        gram.diagonal().add_(lam)  # in place, as the old code did: no N x N copy besides the factor
        factor = torch.linalg.cholesky(gram)
        gram.diagonal().sub_(lam)
        w = torch.cholesky_solve(cross + lam * w0.T, factor).T
        del factor
        e = error(w)
        if e < best_error * (1 - 1e-6):
            best, best_error, best_damp = w, e, damp
    return best, {"refit_error_before": before, "refit_error_after": best_error, "refit_damp": best_damp}


def factor_costs(n: int, dtype: torch.dtype) -> dict:
    """Seconds of one Cholesky and one eigh of a well-conditioned n x n Gram matrix."""
    a = torch.randn(n + n // 2, n, dtype=dtype)
    a = a.T @ a / n + torch.eye(n, dtype=dtype)
    start = time.perf_counter()
    torch.linalg.cholesky(a)
    chol = time.perf_counter() - start
    start = time.perf_counter()
    torch.linalg.eigh(a)
    eigh = time.perf_counter() - start
    return {"n": n, "dtype": str(dtype), "cholesky_s": chol, "eigh_s": eigh, "eigh_over_cholesky": eigh / chol}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--d-ff", type=int, default=14336)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference", action="store_true", help="also run the float64 reference and compare")
    parser.add_argument("--factor-size", type=int, default=0, help="only time Cholesky vs eigh at this size")
    args = parser.parse_args()
    if args.factor_size:
        print(json.dumps([factor_costs(args.factor_size, dt) for dt in (torch.float32, torch.float64)], indent=1))
        return
    device = torch.device(args.device)
    config = RefitConfig(precision=args.precision)
    ffn, order, gates, x = layer(args.d, args.d_ff, args.tokens, args.experts, args.top_k, 0, device)
    solve_seconds = []
    inner = refit.refit_with_holdout

    def timed(*a, **k):
        start = time.perf_counter()
        out = inner(*a, **k)
        if device.type == "cuda":
            torch.cuda.synchronize()
        solve_seconds.append(time.perf_counter() - start)
        return out

    refit.refit_with_holdout = timed
    cpu = time.process_time()
    start = time.perf_counter()
    fitted, metrics = refit.refit_down(ffn, order, gates, x, config, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    total, cpu = time.perf_counter() - start, time.process_time() - cpu
    row = {"d": args.d, "d_ff": args.d_ff, "tokens": args.tokens, "precision": args.precision, "device": str(device),
           "threads": torch.get_num_threads(), "refit_s": total, "refit_cpu_s": cpu, "solve_s": solve_seconds[0],
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, **metrics}
    if device.type == "cuda":
        row["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(row, indent=1), flush=True)
    if args.reference:
        start, cpu = time.perf_counter(), time.process_time()
        ref, ref_metrics = reference(ffn, order, gates, x, config)
        new = fitted.down[:, order].double()
        w0 = ffn.down[:, order].double()
        row.update({"reference_s": time.perf_counter() - start, "reference_cpu_s": time.process_time() - cpu, "reference_damp": ref_metrics["refit_damp"],
                    "reference_error_after": ref_metrics["refit_error_after"],
                    "weights_rel_diff": float((new - ref).norm() / ref.norm()),
                    "correction_rel_diff": float((new - ref).norm() / (ref - w0).norm().clamp_min(1e-30)),
                    "held_error_rel_diff": abs(metrics["refit_error_after"] - ref_metrics["refit_error_after"])
                    / ref_metrics["refit_error_after"]})
        print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
