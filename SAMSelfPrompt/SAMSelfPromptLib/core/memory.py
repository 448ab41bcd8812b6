"""Give freed heap memory back to the operating system during long runs (glibc only).

A volume's slices allocate and free tens of MB of tensors each. glibc keeps freed chunks in its
arenas (the worker thread gets its own), and its mmap threshold rises after the first large frees,
so a 300-slice run's resident memory kept growing by about 3.5 MB per slice with nothing alive to
show for it. ``malloc_trim(0)`` after every few slices returns those pages: measured on 100 slices
of 512 x 512, resident memory then grows only by what the embedding cache and the mask hold.
Elsewhere (macOS, Windows, musl) this is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def trim_heap() -> bool:
    """Return freed heap pages to the OS; False where there is no glibc ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
