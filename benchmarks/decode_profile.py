"""Where a decode token's time goes in moeconv's own runtime: the MoE blocks (the native kernel vs the Python around
it: routing, the packing check, dispatch) vs everything else (attention, norms, the vocabulary projection, generate).

    python benchmarks/decode_profile.py DENSE_SOURCE MOE_CHECKPOINT... [--threads 1] [--dtype float32] [--tokens 64]

Each model decodes --tokens greedy tokens after a 64-token prompt, best of --repeats (per-token times from the
streamer, prefill excluded).  A second, instrumented pass times every MoE block call and every call of the native
ops (moe_block, moe_ffn_out) during decode (wall clock; the wrappers add ~1 us per call, so the parts are scaled to the
uninstrumented time).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moeconv.io.load import load_model  # noqa: E402 - after the path fix


class _Clock:
    """A generate() streamer noting when each put arrives: the prompt, then every new token."""

    def __init__(self, on_first_token=None) -> None:
        self.times: list[float] = []
        self.on_first_token = on_first_token

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) == 2 and self.on_first_token:  # prefill done: what follows is decode
            self.on_first_token()

    def end(self) -> None:
        pass


def _decode_seconds_per_token(model, prompt: torch.Tensor, tokens: int, on_first_token=None) -> float:
    clock = _Clock(on_first_token)
    model.generate(prompt, streamer=clock, do_sample=False, min_new_tokens=tokens, max_new_tokens=tokens, pad_token_id=0)
    return (clock.times[-1] - clock.times[1]) / (len(clock.times) - 2)  # times[0]: the prompt, times[1]: first token


class _Timer:
    """Accumulated wall time of calls wrapped by `wrap`, counted once `on` is set."""

    def __init__(self) -> None:
        self.seconds, self.calls, self.on = 0.0, 0, False

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.on:
                    self.seconds += time.perf_counter() - start
                    self.calls += 1
        return timed


def _profile(model, prompt: torch.Tensor, tokens: int) -> dict[str, float]:
    """Seconds per token: total, in MoE blocks, in the native op (instrumented pass)."""
    blocks, op = _Timer(), _Timer()
    moe_blocks = [m for m in model.modules() if type(m).__name__ == "MoeconvMoeBlock"]
    originals = [(b, b.forward) for b in moe_blocks]
    namespace = torch.ops.moeconv_C  # the native ops are looked up there on every call: wrapping them times each call
    # moe_block: the whole block at decode (router, routing, experts); moe_ffn_out: the experts alone (prefill, or a
    # block that moe_block does not take)
    natives = {name: getattr(namespace, name) for name in ("moe_ffn_out", "moe_block")} if moe_blocks else {}

    def decoding() -> None:
        blocks.on = op.on = True

    try:
        for b, forward in originals:
            b.forward = blocks.wrap(forward)
        for name, native in natives.items():
            setattr(namespace, name, op.wrap(native))
        total = _decode_seconds_per_token(model, prompt, tokens, decoding)
    finally:
        for b, _ in originals:
            del b.forward
        for name, native in natives.items():
            setattr(namespace, name, native)
    steps = tokens - 1  # forwards between the first new token and the last
    return {"total": total, "moe": blocks.seconds / steps, "kernel": op.seconds / steps, "blocks": len(moe_blocks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="dense source first, then moeconv checkpoints")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    prompt = torch.randint(100, 10000, (1, 64), generator=torch.Generator().manual_seed(0))
    print(f"threads {args.threads}, {args.dtype}, MOECONV_CPU_ISA={os.environ.get('MOECONV_CPU_ISA', '(best)')}, "
          f"MOECONV_KERNELS={os.environ.get('MOECONV_KERNELS', '1')}")
    print("| model | decode tok/s | vs dense | ms/token | MoE blocks ms | of which native op ms | MoE Python ms | rest ms |")
    print("|---|---|---|---|---|---|---|---|")
    dense_tps = None
    with torch.inference_mode():
        for path in args.models:
            model = load_model(path, dtype=args.dtype, device="cpu")
            model.generate(prompt[:, :8], do_sample=False, max_new_tokens=4, pad_token_id=0)  # warm-up, packs the blocks
            best = min(_decode_seconds_per_token(model, prompt, args.tokens) for _ in range(args.repeats))
            p = _profile(model, prompt, args.tokens)
            tps = 1 / best
            dense_tps = dense_tps or tps
            share = best / p["total"]  # scale the instrumented pass's parts to the uninstrumented time
            moe, kernel = p["moe"] * share * 1e3, p["kernel"] * share * 1e3
            print(f"| {Path(path).name} | {tps:.2f} | {tps / dense_tps:.3f}x | {best * 1e3:.2f} | {moe:.2f} | {kernel:.2f} | "
                  f"{moe - kernel:.2f} | {best * 1e3 - moe:.2f} |")
            del model


if __name__ == "__main__":
    main()
