"""In-process probes of the GPU check: which CUDA kernels the installed moeconv loads, and a kernel smoke test."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_report() -> int:
    """Which moeconv and which CUDA kernels the installed package loads, and the archs in the library."""
    import torch

    import moeconv
    import moeconv.kernels as K
    from moeconv.kernels import build, native

    cuda = native.cuda_build()
    spec = importlib.util.find_spec(build.CUDA_EXTENSION)
    library = spec.origin if spec else None
    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "moeconv": moeconv.__file__,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "cuda_build": cuda.how, "library": library, "kernel_status": K.kernel_status()}
    if library and shutil.which("cuobjdump"):
        listing = subprocess.run(["cuobjdump", "--list-elf", library], capture_output=True, text=True).stdout
        report["elf_archs"] = sorted({w for w in listing.replace(".", " ").split() if w.startswith("sm_")})
    print(json.dumps(report, indent=1))
    from_tree = Path(moeconv.__file__).resolve().is_relative_to(REPO)
    return 0 if cuda.how == "prebuilt" and not from_tree else 1


def kernel_smoke(device: str) -> int:
    """Small awkward calls of every native path, checked against float64; bad buffers must raise first."""
    import torch

    import moeconv.kernels as K
    from moeconv.kernels import native, ops, reference

    if not native.has_native(torch.device(device), torch.float32):
        print(f"native {device} kernels are not loaded")
        return 1
    lib = torch.ops.moeconv_C if device == "cpu" else torch.ops.moeconv_cuda
    gen = torch.Generator().manual_seed(0)
    failures, checks = [], 0
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for T, E, k, s, d in ((1, 8, 2, 40, 67), (5, 3, 3, 16, 32), (70, 7, 2, 24, 48), (33, 64, 8, 8, 64)):
            ids, weights = K.route(torch.randn(T, E, generator=gen), k, "softmax", True)  # [T, k]
            x = torch.randn(T, d, generator=gen).to(dtype)  # [T, d]
            w_gate, w_up = ((torch.randn(E, s, d, generator=gen) * d**-0.5).to(dtype) for _ in range(2))  # [E, s, d]
            w_down = (torch.randn(E, d, s, generator=gen) * s**-0.5).to(dtype)  # [E, d, s]
            weights = weights.to(dtype)
            host = (x, ids, weights, w_gate, w_up, w_down)
            want = reference.moe_ffn(*(t.double() if t.is_floating_point() else t for t in host))  # float64 oracle
            on_device = [t.to(device) for t in host]
            for path in (ops.PATH_AUTO, ops.PATH_STREAM, ops.PATH_GEMM):
                out = torch.full_like(on_device[0], float("nan"))  # poisoned: an unwritten element fails
                ops.moe_ffn_into(out, *on_device, "silu", None, None, path=path)
                err = float((out.double().cpu() - want).norm() / want.norm())
                checks += 1
                if not err <= tol:
                    failures.append(f"{dtype} T{T} E{E} k{k} s{s} d{d} path {path}: rel err {err:.2e}")
    logits = torch.randn(6, 4, device=device)
    x, w = torch.randn(6, 12, device=device), torch.randn(4, 8, 12, device=device)
    ids, weights = K.route(logits, 2)
    bad = {
        "bf16 weights for fp32 logits": lambda: lib.route_out(logits, 2, "none", False, ids.clone(),
                                                              torch.empty(6, 2, device=device, dtype=torch.bfloat16)),
        "ids [6, 1] for k=2": lambda: lib.route_out(logits, 2, "none", False, ids[:, :1].clone(), weights.clone()),
        "bf16 out for fp32 x": lambda: lib.moe_ffn_out(x, ids, weights, w, w, w.transpose(1, 2), "silu", None, None, 0,
                                                      torch.empty(6, 12, device=device, dtype=torch.bfloat16)),
        "int32 ids": lambda: lib.moe_ffn_out(x, ids.int(), weights, w, w, w.transpose(1, 2), "silu", None, None, 0,
                                            torch.empty_like(x)),
        "w_down [E, s, d]": lambda: lib.moe_ffn_out(x, ids, weights, w, w, w, "silu", None, None, 0, torch.empty_like(x)),
    }
    if device == "cuda":
        bad["ids on the CPU"] = lambda: lib.moe_ffn_out(x, ids.cpu(), weights, w, w, w.transpose(1, 2), "silu", None, None,
                                                        0, torch.empty_like(x))
    # An expert id out of range: the CPU kernel refuses it; the CUDA kernels drop that pair (checking would cost a
    # host sync), which memcheck must see done without a stray access, on both paths.
    ids_out = ids.clone()
    ids_out[2, 1] = 4
    for path in (1, 2):
        out = torch.full_like(x, float("nan"))
        try:
            lib.moe_ffn_out(x, ids_out, weights, w, w, w.transpose(1, 2), "silu", None, None, path, out)
            if device == "cpu" or not bool(out.isfinite().all()):
                failures.append(f"expert id out of range, path {path}: {'accepted' if device == 'cpu' else 'NaN left'}")
        except RuntimeError as exc:
            if device == "cuda":
                failures.append(f"expert id out of range, path {path}: {exc}")
        checks += 1
    for name, call in bad.items():
        checks += 1
        try:
            call()
            failures.append(f"accepted {name}")
        except RuntimeError:
            pass
    if device == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"device": device, "checks": checks, "failures": failures}))
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("probe", choices=["build", "smoke"], help="build: JSON report of the kernels; smoke: run them")
    parser.add_argument("--device", default="cuda", help="smoke: cuda, or cpu to rehearse without a GPU")
    args = parser.parse_args()
    return build_report() if args.probe == "build" else kernel_smoke(args.device)


if __name__ == "__main__":
    sys.exit(main())
