"""The C heap on a CPU: keep freed memory for the next step instead of giving it back to the kernel.

A model step on a CPU allocates the same large temporaries every time (a prefill's MLP activations are tens of MB).
glibc serves blocks over its mmap threshold (128 KB, rising to at most 32 MB as big blocks are freed) with fresh
pages from the kernel and unmaps them on free, and trims the heap's free top beyond twice that threshold: each step
then faults in and zeroes its temporaries again, and in a VM a page fault costs microseconds (BENCHMARKS.md,
"Measurements behind the code"). `vlstack serve` owns its process, so on a CPU it raises both thresholds: big blocks
come from the heap, and freed memory stays there for reuse (the process stays near its high-water mark, heap
fragmentation included). A library call never changes this (it is process-wide), and an operator who sets glibc's own
MALLOC_* or GLIBC_TUNABLES variables keeps their settings. `vlstack train` leaves glibc as it is: a training step's
temporaries vary more in size, and a kept heap fragmented more and ran no faster (the same section)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 256 << 20  # blocks up to this size come from the heap
TRIM_THRESHOLD = 1 << 30  # free memory at the top of a heap kept up to this much


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False (nothing changed) on another C
    library, or when the operator set glibc's malloc tunables themselves."""
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
