"""Build recipes of the native kernels, shared by setup.py (extension_modules) and the JIT loader.

Imports only the standard library and torch, so setup.py can import it before moeconv is built.
Paths are relative to the repository root (where setup.py runs); `absolute=True` resolves them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU_SOURCES = (
    "csrc/cpu/moe_ops.cpp",
    "csrc/cpu/moe_block.cpp",
    "csrc/cpu/moe_avx512bf16.cpp",
    "csrc/cpu/moe_avx512.cpp",
    "csrc/cpu/moe_avx2.cpp",
    "csrc/cpu/moe_generic.cpp",
    "csrc/cpu/quant_ops.cpp",
    "csrc/cpu/quant_avx512.cpp",
    "csrc/cpu/quant_avx2.cpp",
    "csrc/cpu/quant_generic.cpp",
)
CPU_HEADERS = ("csrc/cpu/moe_cpu.h", "csrc/cpu/moe_cpu_impl.h", "csrc/cpu/moe_ops.h", "csrc/cpu/quant_cpu.h", "csrc/cpu/quant_cpu_impl.h", "csrc/cpu/quant_rows_impl.h",
               "csrc/cpu/quant_x86.h")
CUDA_SOURCES = ("csrc/cuda/moe_cuda_ops.cpp", "csrc/cuda/moe_cuda_kernels.cu")
CUDA_HEADERS = ("csrc/cuda/moe_cuda.h",)
CPU_EXTENSION = "moeconv.kernels._C"
CUDA_EXTENSION = "moeconv.kernels._C_cuda"
CUDA_ARCHS = ("80", "90")
HASH_MARKER = b"MOECONV_SOURCE_HASH="


def _paths(paths: tuple[str, ...], absolute: bool) -> list[str]:
    return [str(REPO_ROOT / p) if absolute else p for p in paths]


def cpu_sources(absolute: bool = False) -> list[str]:
    return _paths(CPU_SOURCES, absolute)


def cuda_sources(absolute: bool = False) -> list[str]:
    return _paths(CUDA_SOURCES, absolute)


def all_source_files() -> list[Path]:
    """Every file whose change must trigger a rebuild (the JIT cache key hashes them)."""
    return [REPO_ROOT / p for p in CPU_SOURCES + CPU_HEADERS + CUDA_SOURCES + CUDA_HEADERS]


def source_hash() -> str:
    """Digest of the kernel sources (and of the flags that change what they compile to), compiled into the library so
    a stale prebuilt one is detected."""
    digest = hashlib.sha256(" ".join(openmp_flags()).encode())
    for path in all_source_files():
        if path.exists():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return "h" + digest.hexdigest()[:24]


def embedded_hash(library: Path) -> str | None:
    """The source hash a built library carries (see MOECONV_SOURCE_HASH in csrc), without loading it."""
    data = library.read_bytes()
    at = data.find(HASH_MARKER)
    if at < 0:
        return None
    start = at + len(HASH_MARKER)
    return data[start : data.find(b"\0", start)].decode(errors="replace")


def cxx_flags() -> list[str]:
    # ISA-specific code is selected by `#pragma GCC target` inside each file, not by -m flags,
    # so one flag set serves every source; -O3 enables unrolling of the small dot tiles.
    define = f"-DMOECONV_SOURCE_HASH={source_hash()}"
    if sys.platform == "win32":
        return ["/O2", "/std:c++20", define.replace("-D", "/D", 1)]
    return ["-O3", "-std=c++20", "-Wno-unknown-pragmas", define, *openmp_flags()]


def openmp_flags() -> list[str]:
    """-fopenmp for compiling and linking: ATen's at::parallel_for is a header template whose `#pragma omp parallel`
    exists only under -fopenmp (_OPENMP), so without it every parallel_for of these kernels ran on one thread.  The
    link names libgomp.so.1, which resolves to the copy torch has already loaded (same soname)."""
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def nvcc_flags() -> list[str]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
    return ["-O3", "-std=c++20", f"-DMOECONV_SOURCE_HASH={source_hash()}", *gencode]


def has_cxx_compiler() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None or shutil.which("g++") is not None


def can_build_cuda() -> bool:
    """A CUDA build of torch and an nvcc to match it."""
    try:
        import torch  # setup.py loads this file where torch may be missing
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    return (Path(CUDA_HOME) / "bin" / "nvcc").exists() or shutil.which("nvcc") is not None


def extension_modules() -> list:
    """The setuptools extensions this machine can build (use with torch's BuildExtension).

    CPU extension wherever a C++ compiler exists; the CUDA one only where torch is a CUDA build
    and nvcc exists.  setup.py: `ext_modules=extension_modules(), cmdclass={"build_ext": BuildExtension}`.
    """
    from torch.utils.cpp_extension import CppExtension, CUDAExtension  # setup.py loads this file where torch may be missing

    extensions = []
    if has_cxx_compiler():
        extensions.append(
            CppExtension(CPU_EXTENSION, cpu_sources(), extra_compile_args={"cxx": cxx_flags()},
                         extra_link_args=openmp_flags(), include_dirs=["csrc/cpu"])
        )
    if can_build_cuda():
        extensions.append(
            CUDAExtension(
                CUDA_EXTENSION,
                cuda_sources(),
                extra_compile_args={"cxx": cxx_flags(), "nvcc": nvcc_flags()},
                extra_link_args=openmp_flags(),  # its host code is compiled with -fopenmp too (cxx_flags)
                include_dirs=["csrc/cuda"],
            )
        )
    return extensions
