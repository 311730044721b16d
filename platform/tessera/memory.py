"""Handing freed heap memory back to the OS in long-lived workers.

A text encoder actor frees its activations after every micro-batch, but glibc's allocator keeps the
freed pages: activations change shape with every batch's longest sequence, the freed chunks end up
scattered between live ones in the per-thread arenas, and the process's resident memory grows with
the corpus. Measured in a plain encode loop over 100k real texts (8192 a call, RSS after each):
1.35 -> 2.65 GB without a trim, 1.10 -> 1.34 GB with one after each call, at the same speed.
``malloc_trim(0)`` returns every free page of every arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS (glibc ``malloc_trim(0)``); False where unsupported.

    It walks every arena (cost per call not measured; once per 8192-text batch left the encode loop's
    speed unchanged): call it per large batch, not per item.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
