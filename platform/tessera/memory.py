"""Keeping long-lived encoder workers' memory flat: jemalloc for the pools, a heap trim otherwise.

A text encoder actor frees its activations after every micro-batch, and they change shape with every
batch's longest sequence. glibc's allocator keeps the freed chunks scattered between live ones in its
per-thread arenas, so the process's resident memory grows with the corpus. Measured in a plain encode
loop over 100k real texts (8192 a call, RSS after each): 1.35 -> 2.65 GB without a trim, 1.10 -> 1.34 GB
with ``malloc_trim(0)`` after each call, at the same speed; the peak *inside* a call still grew
(1.46 -> 1.59 GB over 49k shuffled texts), from fragmentation the trim does not undo.

jemalloc (the one Ray ships as ``ray/core/libjemalloc.so``, preloaded into the encoder pools' worker
processes with :func:`allocator_env`) keeps that peak flat and lower: same loop, 49k shuffled texts,
in-call peak 1,102 -> 1,114 MB with :data:`JEMALLOC_CONF` (``bench/encoder_memory.py``, see
``configs/embed.yaml`` for the job's figures). Its background thread hands freed pages back within
about a second, so no trim is needed there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
from pathlib import Path
from typing import Literal

Allocator = Literal["jemalloc", "system"]

# Freed pages go back to the OS after ~1 s, from jemalloc's own background thread (not from the next
# allocation), and are unmapped rather than kept "muzzy". Tried on the 8192-text loop: the defaults
# (10 s decay, no background thread) kept ~1.2 GB in-call peaks, this ~1.1 GB, at the same speed.
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"


def jemalloc_library() -> str | None:
    """Path of the jemalloc shared library installed with Ray (``ray/core/libjemalloc.so``), or None."""
    spec = importlib.util.find_spec("ray")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "core" / "libjemalloc.so"
    return str(path) if path.is_file() else None


def allocator_env(allocator: Allocator) -> dict[str, str]:
    """Environment variables that start a worker process on ``allocator`` (for a Ray ``runtime_env``).

    ``jemalloc`` preloads Ray's jemalloc ahead of whatever the node already preloads (Ray expands
    ``${LD_PRELOAD}`` on the node); empty for ``system``, or where this Ray ships no jemalloc. The
    path is this machine's: a node whose Ray lives elsewhere ignores the preload (the dynamic loader
    says so in the worker's log) and runs on its system allocator, which :func:`active_allocator`
    reports.
    """
    if allocator == "system":
        return {}
    lib = jemalloc_library()
    if lib is None:
        return {}
    return {"LD_PRELOAD": f"{lib} ${{LD_PRELOAD}}", "MALLOC_CONF": JEMALLOC_CONF}


@functools.cache
def active_allocator() -> str:
    """``jemalloc`` when this process's ``malloc`` is jemalloc (it exports ``mallctl``), else ``system``."""
    return "jemalloc" if hasattr(ctypes.CDLL(None), "mallctl") else "system"


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

    Under jemalloc it does nothing and returns False: glibc's heap is not where the memory is, and
    jemalloc's background thread already returns freed pages (:data:`JEMALLOC_CONF`).

    It walks every arena (cost per call not measured; once per 8192-text batch left the encode loop's
    speed unchanged): call it per large batch, not per item.
    """
    if active_allocator() == "jemalloc":
        return False
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
