"""Process-level settings for runs on the CPU.

torch on the CPU takes every tensor from the C library's malloc. glibc serves a block of 32 MiB or
more (its largest mmap threshold) with a fresh mmap and hands it back to the kernel when it is
freed, so each such tensor is zero-filled page by page on its first write, every step again. The
first tap of the built-in CPU run is (32, 64, 64, 64) float32 = 32 MiB, and its context block makes
several of those per step: measured on 2 cores (2026-12-02), 1.9-2.0 s per step as glibc ships, 1.5
s with freed memory kept for reuse (resident memory +5 %). :func:`reuse_freed_memory` sets that.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_done = False


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for the next tensor (no mmap per large block, no trimming).

    Does nothing, and returns False, off glibc, when the allocator is preloaded (jemalloc,
    tcmalloc), when malloc is tuned already (MALLOC_MMAP_MAX_, MALLOC_MMAP_THRESHOLD_,
    MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_ or glibc.malloc.* in GLIBC_TUNABLES: the user's choice
    wins) or when MLVICX_MALLOC=0. Returns True once applied. Affects this whole process; call it
    on CPU runs.
    """
    global _done
    if _done:
        return True
    if os.environ.get("MLVICX_MALLOC", "1") == "0" or any(v in os.environ for v in _ENV) \
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; every block from the heap, and the heap's top kept up to 1 GiB
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _done
