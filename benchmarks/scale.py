"""`moeconv convert` at 8B width on this machine: peak memory against depth, seconds per layer by stage, identity, resume.

    python benchmarks/make_synthetic.py /data/synth-8b --gguf Q8_0              # 32 layers (+ /data/synth-8b-Q8_0/)
    python benchmarks/make_synthetic.py /data/synth-8b-4l --layers 4 --gguf Q8_0
    python benchmarks/scale.py --work /data/scale --source /data/synth-8b-4l --source /data/synth-8b \\
        --source /data/synth-8b-4l-Q8_0/model.gguf --source /data/synth-8b-Q8_0/model.gguf --identity --kill-resume

Every --source is converted with the default recipe (configs/dot-moe.yaml; E=8 k=2 unless told, --tokens calibration tokens) in its own
process (stage_memory.py: each step's seconds and its own peak RSS), and summarized as seconds per layer by stage (the
mean over the layers converted), the peak RSS, the ratio of each peak to the shallowest source's of the same format,
the wall time and its projection to --project-layers layers.  --max-layers stops a deep source's conversion after that
many layers (the projection then comes from them).  --identity converts the first (shallowest) source with
`--experts 8 --top-k 8 --method random --no-router-training --no-refit` in float32 and compares the logits of a short prompt with the
source's.  --kill-resume SIGKILLs a conversion of the first source at a random moment, resumes it, and compares every
output file byte for byte with the uninterrupted conversion's.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEP = re.compile(r"^\s*([\d.]+)s\s+(.+?) \(layer (\S+)\)\s+([\d.]+)s\s+peak ([\d.]+) GiB")
CLI = [sys.executable, "-m", "moeconv.cli.app"]
RECIPE = HERE.parent / "configs" / "dot-moe.yaml"  # the default recipe, as the README runs it


def convert_staged(src: str, out: Path, tokens: int, experts: int, top_k: int, max_layers: int | None) -> dict:
    """One stage_memory.py run: mean seconds per layer by stage, peak RSS, wall time (max_layers: stop after them)."""
    cmd = [sys.executable, str(HERE / "stage_memory.py"), src, str(out), "--recipe", str(RECIPE), "--tokens", str(tokens),
           "--experts", str(experts), "--top-k", str(top_k)]
    if max_layers:
        cmd += ["--max-layers", str(max_layers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stages: dict[str, list[float]] = defaultdict(list)
    peak, layers_done, plan, end = 0.0, 0, {}, {}
    for line in proc.stdout:
        print(line, end="", file=sys.stderr, flush=True)
        if line.startswith("{"):
            if plan:  # the first JSON line is the dry run's plan, the last the run's wall time
                end = json.loads(line)
            else:
                plan = json.loads(line)
            continue
        m = STEP.match(line)
        if not m:
            continue
        stage, layer, seconds, step_peak = m[2], m[3], float(m[4]), float(m[5])
        peak = max(peak, step_peak)
        if layer != "None":
            stages[stage].append(seconds)
        layers_done += stage == "done"
    if proc.wait() != 0:
        raise SystemExit(f"conversion of {src} failed (exit {proc.returncode})")
    return {"source": src, "layers": layers_done, "peak_gib": peak, "plan": plan, "wall_s": end["wall_s"],
            "complete": end["complete"], "stage_s": {k: sum(v) / len(v) for k, v in stages.items()}}


def identity_check(src: str, work: Path) -> float:
    """Largest relative logit difference between the source and its 8-experts-top-8 conversion (float32)."""
    out = work / "identity"
    subprocess.run([*CLI, "convert", src, str(out), "--experts", "8", "--top-k", "8", "--method", "random", "--no-router-training",
                    "--no-refit", "--dtype", "float32", "--force", "-q"], check=True)
    code = (
        "import sys, torch\n"
        "from moeconv.io.load import load_model\n"
        "ids = torch.tensor([[1, 17, 300, 900, 25, 99, 7, 512]])\n"
        "with torch.no_grad():\n    logits = [load_model(p, dtype='float32')(ids).logits for p in sys.argv[1:]]\n"
        "print(((logits[0] - logits[1]).abs().max() / logits[0].abs().max()).item())\n")
    result = subprocess.run([sys.executable, "-c", code, src, str(out)], check=True, capture_output=True, text=True)
    return float(result.stdout.strip().splitlines()[-1])


def kill_resume_check(src: str, work: Path, recipe: list[str], reference: Path, span: float, seed: int) -> dict:
    """SIGKILL a CLI conversion of src at a random moment of its first `span` seconds, resume it, and compare every file
    with `reference` (the same conversion, uninterrupted, through the library)."""
    out = work / "killed"
    cmd = [*CLI, "convert", src, str(out), *recipe, "-q"]
    at = random.Random(seed).uniform(0.1, 0.9) * span
    proc = subprocess.Popen([*cmd, "--force"], start_new_session=True)
    time.sleep(at)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run([*cmd, "--resume"], check=True)
    names = sorted(p.name for p in reference.iterdir() if p.is_file())
    differ = [n for n in names if not (out / n).is_file() or not filecmp.cmp(reference / n, out / n, shallow=False)]
    return {"killed_after_s": at, "files": len(names), "differ": differ}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="outputs go here (one folder per source)")
    parser.add_argument("--source", action="append", required=True, help="a dense folder or GGUF (repeat)")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--max-layers", type=int, help="stop each conversion after this many layers")
    parser.add_argument("--project-layers", type=int, default=32)
    parser.add_argument("--identity", action="store_true")
    parser.add_argument("--kill-resume", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [convert_staged(src, args.work / f"moe-{n}", args.tokens, args.experts, args.top_k, args.max_layers)
            for n, src in enumerate(args.source)]
    extra = {}
    if args.identity:
        extra["identity_max_rel"] = identity_check(args.source[0], args.work)
    if args.kill_resume:
        if not rows[0]["complete"]:
            raise SystemExit("--kill-resume compares with the first source's complete conversion: drop --max-layers")
        recipe = ["--recipe", str(RECIPE), "--experts", str(args.experts), "--top-k", str(args.top_k), "--calib-tokens", str(args.tokens)]
        extra["kill_resume"] = kill_resume_check(args.source[0], args.work, recipe, args.work / "moe-0",
                                                 rows[0]["wall_s"], args.seed)
    print(json.dumps({"rows": rows, **extra}), file=sys.stderr)
    report(rows, extra, args)


def report(rows: list[dict], extra: dict, args: argparse.Namespace) -> None:
    stages = list(dict.fromkeys(k for r in rows for k in r["stage_s"]))
    base = {}
    for r in rows:  # the shallowest source of each format is the memory baseline
        fmt = "gguf" if r["source"].endswith(".gguf") else "safetensors"
        base.setdefault(fmt, r["peak_gib"])
        r["ratio"] = r["peak_gib"] / base[fmt]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"{date.today()}, {cpu} ({os.cpu_count()} cores, {platform.machine()}), E={args.experts} "
          f"k={args.top_k}, default recipe, {args.tokens} calibration tokens\n")
    print("| source | layers converted | peak RSS GiB (predicted) | ratio | s/layer (predicted) | " + " | ".join(stages) +
          f" | wall s | projected {args.project_layers} layers |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(stages) + "---:|---:|")
    for r in rows:
        per_layer = sum(r["stage_s"].values())
        print(f"| {r['source']} | {r['layers']}{'' if r['complete'] else ' (stopped)'} | {r['peak_gib']:.2f} "
              f"({r['plan']['predicted_peak_gib']:.2f}) | {r['ratio']:.2f}x | {per_layer:.0f} "
              f"({r['plan']['predicted_s_per_layer']:.0f}) | " + " | ".join(f"{r['stage_s'].get(s, 0):.1f}" for s in stages) +
              f" | {r['wall_s']:.0f} | {per_layer * args.project_layers / 3600:.2f} h |")
    if "identity_max_rel" in extra:
        print(f"\nidentity (8 experts top 8, no router training, no refit, float32): max relative logit difference "
              f"{extra['identity_max_rel']:.2e}")
    if "kill_resume" in extra:
        k = extra["kill_resume"]
        print(f"kill + resume: SIGKILL after {k['killed_after_s']:.0f} s, {k['files']} files compared, "
              f"{'all identical' if not k['differ'] else 'DIFFER: ' + ', '.join(k['differ'])}")


if __name__ == "__main__":
    main()
