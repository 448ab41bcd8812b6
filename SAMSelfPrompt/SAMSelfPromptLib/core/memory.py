"""Heap memory during long runs (glibc only): keep freed tensors for the next slice, and give what is
free back to the operating system every few slices.

A volume's slices allocate and free tens of MB of tensors each. glibc keeps freed chunks in its
arenas (the worker thread gets its own), and its mmap threshold rises after the first large frees,
so a 300-slice run's resident memory kept growing by about 3.5 MB per slice with nothing alive to
show for it. ``malloc_trim(0)`` after every few slices returns those pages: measured on 100 slices
of 512 x 512, resident memory then grows only by what the embedding cache and the mask hold.
Elsewhere (macOS, Windows, musl) this is a no-op.

Between those trims, ``reuse_freed_heap`` keeps the encoder's freed tensors for the next slice. glibc
serves an allocation above its mmap threshold with fresh pages from the kernel, each zeroed on its
first touch. It starts that threshold at 128 KB and raises it to the largest such chunk freed so far
(at most 32 MB), and trims the heap's top beyond twice the threshold. Over an encoder run it never
settles: measured on CT slices, 17-31 thousand page faults a slice (70-120 MB of fresh pages) and
33-72 ms of kernel time a slice out of about 700 ms of CPU time. With the mmap threshold fixed at its
upper bound (32 MB) and the trim threshold at 256 MB, encodes after the first two take no page faults
(docs/RESULTS.md, Speed).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache


# mallopt's parameters (malloc.h) and the values reuse_freed_heap fixes them at: glibc's
# DEFAULT_MMAP_THRESHOLD_MAX on 64-bit for the mmap threshold; for the trim threshold 256 MB, not the 64 MB
# glibc's own rule would pair with it: set after the imports, 64 MB still let the heap top be trimmed
# under a slice's working set (5-16 thousand faults on some slices), 256 MB did not after the second.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 256 << 20


@lru_cache(maxsize=1)
def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):  # musl and others: no malloc_trim or mallopt
        return None
    return libc


def trim_heap() -> bool:
    """Return freed heap pages to the OS; False where there is no glibc ``malloc_trim``."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@lru_cache(maxsize=1)
def reuse_freed_heap() -> bool:
    """Fix glibc's mmap and trim thresholds (32 MB and 256 MB), for the whole process and once; False where
    there is no glibc ``mallopt``. Chunks below 32 MB then come from the heap from the start, as glibc would
    serve them anyway once one that size had been freed, and up to 256 MB of freed heap top is kept for
    the next slice until ``trim_heap`` returns it."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
