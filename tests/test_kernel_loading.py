"""Loading the native kernels: forced and unknown vector paths, MOECONV_KERNELS=0, and a build that cannot be wedged."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moeconv.kernels as K
from moeconv.errors import MoeconvError
from moeconv.kernels import build, native

REPO = Path(__file__).resolve().parents[1]


def test_forced_cpu_isa_env_var_selects_the_generic_path():
    """MOECONV_CPU_ISA=generic makes the dispatcher (and `moeconv env`) use the portable path."""
    if not native.cpu_build().loaded:
        pytest.skip("CPU kernels not loaded")
    script = (
        "import torch\n"
        "import moeconv.kernels as K\n"
        "from moeconv.kernels import native\n"
        "print(native.cpu_isa())\n"
        "print(K.kernel_status()['moe_ffn'])\n"
    )
    env = {**os.environ, native.CPU_ISA_ENV: "generic", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "generic" and "cpu: native generic [" in lines[1], lines


def test_unknown_forced_cpu_isa_raises_a_clear_error():
    if not native.cpu_build().loaded:
        pytest.skip("CPU kernels not loaded")
    with pytest.raises(MoeconvError, match="MOECONV_CPU_ISA='sse' is not a CPU kernel path"):
        native._force_cpu_isa("sse")
    with pytest.raises(RuntimeError, match="not available"):
        native.set_cpu_isa("avx1024")


def test_native_loads_where_a_compiler_exists():
    if not native.native_enabled() or not build.has_cxx_compiler():
        pytest.skip("native kernels disabled or no C++ compiler")
    assert native.cpu_build().loaded, native.cpu_build().how
    status = K.kernel_status()
    assert set(status) == {"route", "moe_ffn", "moe_block", "quant_linear", "quant_moe_ffn"}
    assert all("cpu: native" in status[op] for op in ("moe_ffn", "moe_block", "quant_linear", "quant_moe_ffn"))


def test_disabled_kernels_fall_back_and_build_recipe_is_standalone():
    """MOECONV_KERNELS=0 uses the reference; build.py imports without the rest of moeconv."""
    script = (
        "import importlib.util, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location('b', {str(REPO / 'moeconv/kernels/build.py')!r})\n"
        "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)\n"
        "exts = b.extension_modules()\n"
        "assert not any(m.startswith('moeconv') for m in sys.modules), 'build.py imported moeconv'\n"
        "print([e.name for e in exts])\n"
        "import moeconv.kernels as K\n"
        "print(K.kernel_status()['moe_ffn'])\n"
        "ids, w = K.route(torch.randn(5, 4), 2)\n"
        "print(K.moe_ffn(torch.randn(5, 8), ids, w, torch.randn(4, 3, 8), torch.randn(4, 8, 3)).shape)\n"
    )
    env = {**os.environ, "MOECONV_KERNELS": "0", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "moeconv.kernels._C" in lines[0] and "reference (disabled by MOECONV_KERNELS=0)" in lines[1], lines
    assert lines[2] == "torch.Size([5, 8])"


def test_a_build_lock_left_by_a_killed_run_does_not_wedge_the_next(tmp_path):
    """The next run must load (or fall back) in seconds, not wait on a lock whose holder is dead."""
    built = native.cache_dir("cpu")
    if not (built / "moeconv_kernels_cpu.so").is_file():
        pytest.skip(f"no JIT build of the CPU kernels in {built} to start from (the prebuilt library is current)")
    private = tmp_path / "cache" / built.name
    shutil.copytree(built, private, ignore=shutil.ignore_patterns("lock"))
    (private / "lock").touch()  # what a SIGKILL inside cpp_extension.load leaves
    script = ("from moeconv.kernels import native\n"
              "native._stale_prebuilt = lambda module: 'stale prebuilt library'  # the JIT path, as with an outdated build\n"
              "print(native.cpu_build())\n")
    env = {**os.environ, "MOECONV_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    try:
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("still waiting on the dead run's build lock after 20 s")
    assert result.returncode == 0 and "loaded=True" in result.stdout, result.stdout + result.stderr


def test_native_kernels_are_built_with_openmp_and_agree_across_thread_counts():
    """Without -fopenmp ATen's at::parallel_for compiles to a serial loop: the library must call libgomp's parallel
    region (GOMP_parallel), and 1 and 2 threads must give the same bits (each thread owns its rows / columns)."""
    if not native.cpu_build().loaded or not sys.platform.startswith("linux"):
        pytest.skip("CPU kernels not loaded (or not Linux, where the build uses OpenMP)")
    library = next(line.split()[-1] for line in open("/proc/self/maps") if "moeconv" in line and line.rstrip().endswith(".so"))
    assert b"GOMP_parallel" in Path(library).read_bytes(), f"{library} has no OpenMP parallel region"
    torch.manual_seed(0)
    x, router = torch.randn(3, 64), torch.randn(8, 64)
    gate, up, down = torch.randn(8, 48, 64), torch.randn(8, 48, 64), torch.randn(8, 64, 48)
    outputs = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outputs.append(torch.ops.moeconv_C.moe_block(x, router, 2, "softmax", True, gate, up, down, "silu",
                                                         None, None, None, None, None, None, None, None))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(outputs[0], outputs[1])
