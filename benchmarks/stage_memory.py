"""Per-step peak memory and seconds of one `moeconv convert` (or `quantize`), beside what --dry-run predicted for it.

    OMP_NUM_THREADS=1 python benchmarks/make_synthetic.py /tmp/synth-8b-2l --layers 2
    OMP_NUM_THREADS=1 python benchmarks/stage_memory.py /tmp/synth-8b-2l /tmp/moe-8b-2l --tokens 4096
    python benchmarks/stage_memory.py /tmp/moe-8b-2l /tmp/int4-8b-2l --job quantize --tokens 4096

Each progress event closes a step: its peak is VmHWM, which is reset (/proc/self/clear_refs) when the step
starts, so every line shows that step's own peak (Linux only). The first line is the plan's prediction:
peak memory by part and seconds per layer by stage.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moeconv.config import load_quant_recipe, load_recipe
from moeconv.convert import convert
from moeconv.quantize import quantize

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class _Stop(Exception):
    """--max-layers reached."""


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("out", type=Path)
    parser.add_argument("--job", choices=["convert", "quantize"], default="convert")
    parser.add_argument("--recipe", type=Path, help="default: configs/dot-moe.yaml (convert), configs/gptq-int4.yaml (quantize)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--max-layers", type=int, help="stop when this many layers are done (a deep model's first "
                        "layers; the output is left unfinished)")
    args = parser.parse_args()
    if args.job == "convert":
        recipe = load_recipe(args.recipe or CONFIGS / "dot-moe.yaml",
                             {"experts": args.experts, "top_k": args.top_k, "calibration.tokens": args.tokens})
        job, first_stage = convert, "capture"
        plan = convert(args.src, args.out, recipe, dry_run=True)
        print(json.dumps({"predicted_peak_gib": plan.peak_bytes_estimate / 2**30,
                          "parts_gib": {k: v / 2**30 for k, v in plan.memory_parts.items()},
                          "predicted_s_per_layer": plan.seconds_per_layer_estimate,
                          "stage_s": {k: v / plan.flop_rate for k, v in plan.layer_flops.items()},
                          "flop_rate_gflops": plan.flop_rate / 1e9}), flush=True)
    else:
        recipe = load_quant_recipe(args.recipe or CONFIGS / "gptq-int4.yaml", {"calibration.tokens": args.tokens})
        job, first_stage = quantize, "materialize"
        plan = quantize(args.src, args.out, recipe, dry_run=True)
        print(json.dumps({"predicted_peak_gib": plan.peak_bytes_estimate / 2**30}), flush=True)
    start = last = time.perf_counter()
    step = None

    def progress(event) -> None:
        nonlocal last, step
        now = time.perf_counter()
        if step is not None:
            print(f"{now - start:8.1f}s  {step:45s} {now - last:7.1f}s  peak {_status('VmHWM'):.2f} GiB", flush=True)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM restarts from the current RSS
        step, last = f"{event.stage} (layer {event.layer})", now
        if args.max_layers and event.stage == first_stage and event.layer >= args.max_layers:
            raise _Stop

    cpu = time.process_time()
    try:
        job(args.src, args.out, recipe, force=True, progress=progress)
        complete = True
    except _Stop:
        complete = False
    print(json.dumps({"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "complete": complete}),
          flush=True)


if __name__ == "__main__":
    main()
