"""Finds the native kernels: the prebuilt extension, else a JIT build into a cache dir, else none.

MOECONV_KERNELS=0 disables native code; MOECONV_CACHE_DIR moves the JIT cache (default
~/.cache/moeconv/kernels); MOECONV_CPU_ISA=generic|avx2|avx512|avx512bf16 forces the CPU kernels'
vector path (by default the best this CPU has).  A missing build is logged once and the ops fall
back to the reference.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from moeconv.errors import MoeconvError
from moeconv.kernels import build

logger = logging.getLogger(__name__)

NATIVE_DTYPES = (torch.float32, torch.bfloat16)
# The CPU kernels' vector paths, best first, and what each does per dtype (for `moeconv env`).
CPU_ISAS = ("avx512bf16", "avx512", "avx2", "generic")
CPU_ISA_PATHS = {
    "avx512bf16": "bf16 by AVX512-BF16 dot products, fp32 by AVX-512 FMA",
    "avx512": "AVX-512 FMA, bf16 widened to fp32",
    "avx2": "AVX2 FMA, bf16 widened to fp32",
    "generic": "portable C++, bf16 widened to fp32",
}
CPU_ISA_ENV = "MOECONV_CPU_ISA"


class CpuIsaError(MoeconvError):
    """MOECONV_CPU_ISA names a vector path that is unknown or that this CPU/build lacks."""


@dataclass(frozen=True)
class NativeBuild:
    """Whether a native library is loaded, and how (or why not), in words for `moeconv env`."""

    loaded: bool
    how: str


def native_enabled() -> bool:
    return os.environ.get("MOECONV_KERNELS", "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir(kind: str) -> Path:
    """JIT build dir, keyed by the sources' content, torch and Python versions (never stale)."""
    digest = hashlib.sha256(f"{build.source_hash()}|{torch.__version__}|{sys.version_info[:2]}".encode())
    root = os.environ.get("MOECONV_CACHE_DIR") or Path.home() / ".cache" / "moeconv" / "kernels"
    return Path(root) / f"{kind}-{digest.hexdigest()[:16]}"


def _jit_load(kind: str, sources: list[str], cuda: bool) -> None:
    from torch.utils import cpp_extension  # only for a JIT build: importing it costs start-up time every process would pay

    directory = cache_dir(kind)
    directory.mkdir(parents=True, exist_ok=True)
    logger.info("building moeconv %s kernels (first use only, about a minute) in %s", kind, directory)
    # torch's own build lock is a plain file that a killed build leaves behind, and every later build then waits on
    # it forever. An flock is released by the kernel however its holder dies: whoever holds it is the only builder,
    # so a torch lock file found then is a dead one.
    with open(directory / "moeconv.flock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (directory / "lock").unlink(missing_ok=True)
        cpp_extension.load(
            name=f"moeconv_kernels_{kind}",
            sources=sources,
            extra_cflags=build.cxx_flags(),
            extra_cuda_cflags=build.nvcc_flags() if cuda else None,
            extra_ldflags=build.openmp_flags(),
            extra_include_paths=[str(Path(sources[0]).parent)],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )


def _one_line(exc: Exception) -> str:
    """A build error in one line: its first line and, from a compiler's output, the first line saying `error:`."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    cause = next((line for line in lines[1:] if "error:" in line.lower()), None)
    return f"{lines[0]}: {cause}" if cause else lines[0]


def _stale_prebuilt(module: str) -> str | None:
    """Why the prebuilt library must not be used (missing, or built from other sources), else None.

    Only a source checkout can be stale: an installed wheel has no csrc/ to compare with.
    """
    try:
        spec = importlib.util.find_spec(module)
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    if spec is None or spec.origin is None:
        return "no prebuilt library"
    if not all(p.exists() for p in build.all_source_files()[:2]):
        return None
    built = build.embedded_hash(Path(spec.origin))
    if built != build.source_hash():
        logger.warning("prebuilt %s is stale (built from other sources); rebuild it (pip install -e .)", spec.origin)
        return "stale prebuilt library"
    return None


def _load(kind: str, module: str, namespace: str, can_jit: bool, sources: list[str], cuda: bool) -> NativeBuild:
    if not native_enabled():
        return NativeBuild(False, "disabled by MOECONV_KERNELS=0")
    if hasattr(torch.ops, namespace) and hasattr(getattr(torch.ops, namespace), "moe_ffn_out"):
        return NativeBuild(True, "already loaded")
    prebuilt_error = _stale_prebuilt(module)
    if prebuilt_error is None:
        try:
            importlib.import_module(module)
            return NativeBuild(True, "prebuilt")
        except ImportError as exc:
            prebuilt_error = f"{type(exc).__name__}: {exc}"
    if not can_jit:
        logger.warning(
            "moeconv %s kernels are not built (%s) and cannot be JIT-built here; using the PyTorch reference",
            kind,
            prebuilt_error,
        )
        return NativeBuild(False, "not built, no compiler")
    try:
        _jit_load(kind, sources, cuda)
    except Exception as exc:  # noqa: BLE001 - any build failure means: fall back, say why once
        logger.warning("moeconv %s kernels failed to JIT-build (%s); using the PyTorch reference", kind, _one_line(exc))
        return NativeBuild(False, f"JIT build failed: {type(exc).__name__}")
    return NativeBuild(True, "jit")


@functools.cache
def cpu_build() -> NativeBuild:
    """Loads the CPU kernels once, then applies MOECONV_CPU_ISA (raises CpuIsaError if it cannot)."""
    loaded = _load("cpu", build.CPU_EXTENSION, "moeconv_C", build.has_cxx_compiler(), build.cpu_sources(True), False)
    forced = os.environ.get(CPU_ISA_ENV, "").strip().lower()
    if loaded.loaded and forced:
        _force_cpu_isa(forced)
    return loaded


def _force_cpu_isa(isa: str) -> None:
    if isa not in CPU_ISAS:
        raise CpuIsaError(f"{CPU_ISA_ENV}={isa!r} is not a CPU kernel path; use one of {', '.join(CPU_ISAS)} or unset it")
    try:
        torch.ops.moeconv_C.set_cpu_isa(isa)
    except RuntimeError:
        raise CpuIsaError(
            f"{CPU_ISA_ENV}={isa!r}: this CPU (or build) lacks that path; pick a lower one of {', '.join(CPU_ISAS)}"
        ) from None


@functools.cache
def cuda_build() -> NativeBuild:
    if not torch.cuda.is_available():
        return NativeBuild(False, "no CUDA device")
    return _load("cuda", build.CUDA_EXTENSION, "moeconv_cuda", build.can_build_cuda(), build.cuda_sources(True), True)


def has_native(device: torch.device, dtype: torch.dtype) -> bool:
    """True when the native kernel for this device type and dtype is loaded (loads it if needed)."""
    if dtype not in NATIVE_DTYPES:
        return False
    if device.type == "cpu":
        return cpu_build().loaded
    if device.type == "cuda":
        return cuda_build().loaded
    return False


def cpu_isa() -> str | None:
    """The vector path the CPU kernels dispatch to (one of CPU_ISAS), None if not loaded."""
    return str(torch.ops.moeconv_C.cpu_isa()) if cpu_build().loaded else None


def set_cpu_isa(isa: str) -> str:
    """Force the CPU kernels' path (one of CPU_ISAS that this CPU has); returns the previous one.

    For tests and benchmarks; raises RuntimeError when unavailable or the CPU build is not loaded.
    """
    if not cpu_build().loaded:
        raise RuntimeError(f"moeconv CPU kernels are not loaded ({cpu_build().how})")
    return str(torch.ops.moeconv_C.set_cpu_isa(isa))


def available_cpu_isas() -> list[str]:
    """The CPU kernel ISAs this machine can run (empty when the CPU build is not loaded)."""
    if not cpu_build().loaded:
        return []
    current, found = cpu_isa(), []
    for isa in CPU_ISAS:
        try:
            set_cpu_isa(isa)
            found.append(isa)
        except RuntimeError:
            pass
    set_cpu_isa(current)
    return found
