"""Freed tensor buffers go back to the operating system during a job.

glibc serves allocations above its mmap threshold with mmap and unmaps them when freed, but the threshold is dynamic:
after the first large free it rises towards 32 MiB, and from then on every 1–32 MiB buffer (an 8B expert's
4096 x 1792 float32 matrices are 28 MiB) comes from the heap, whose freed fragments are kept. Fixing the threshold
turns the dynamic rise off (mallopt(3)): quantize's RSS over an 8-layer d 1024 MoE went from 1.01 -> 1.45 GiB to
0.56 -> 0.66 GiB, and its growth at 8B slowed (most of that remains: benchmarks/RESULTS.md, issue 16).

Freed memory below the threshold still stays resident in the heap: between layers of an 8B quantize, 1.69 GiB of RSS
held 0.07 GiB of live tensors. Jobs hand it back after each layer (malloc_trim(3)): 1.69 -> 0.46 GiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 1 << 20  # buffers of 1 MiB and more are mapped, and unmapped when freed


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def keep_large_buffers_mapped() -> bool:
    """Fix glibc's mmap threshold at THRESHOLD for this process; False where there is no glibc (nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(_libc().mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the system (after a layer); False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        _libc().malloc_trim(0)
        return True
    except (OSError, AttributeError):  # musl and others: no malloc_trim
        return False
