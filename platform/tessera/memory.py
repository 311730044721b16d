"""Keeping long-lived encoder workers' memory flat: jemalloc for the pools, a heap trim otherwise.

A text encoder actor frees its activations after every micro-batch, and they change shape with every
batch's longest sequence. glibc's allocator keeps the freed chunks scattered between live ones in its
per-thread arenas, so the process's resident memory grows with the corpus. Measured in a plain encode
loop over 100k real texts (8192 a call, RSS after each): 1.35 -> 2.65 GB without a trim, 1.10 -> 1.34 GB
with ``malloc_trim(0)`` after each call, at the same speed; the peak *inside* a call still grew
(1.46 -> 1.59 GB over 49k shuffled texts), from fragmentation the trim does not undo.

jemalloc (the one Ray ships as ``ray/core/libjemalloc.so``, preloaded into the encoder pools' worker
processes with :func:`allocator_env`) keeps that peak lower, and flat in this one-process loop (its size
classes fragment less; in the embedding job an actor's peak still grew 7% from 10k to 100k texts).
``bench/encoder_memory.py``, 49k shuffled texts, 8192 a call, 2 threads: in-call peak 1,458 -> 1,591 MB
on glibc with the trim, 1,165 -> 1,191 MB on jemalloc's defaults, 1,102 -> 1,114 MB with a 1 s decay
on a background thread. That decay cost CPU, though: 8192 texts a run, 2048 a call, 1 thread, same
machine back to back (``/usr/bin/time``): glibc + trim 77 s user + 2.5 s system (786k minor faults),
jemalloc with the 1 s decay 79 + 11.3 s (5.4M faults: pages handed back and touched again within a
call), never decaying 81 + 1.7 s (230k) but a peak as high as glibc's (1,266 vs 1,297 MB). So
:data:`JEMALLOC_CONF` never purges by time and :func:`release_free_heap` purges once per encoder call
(as the glibc trim was): 86 + 2.3 s (414k faults), in-call peak 1,154 -> 1,157 MB, 112 texts/s
(glibc's runs: 108-120). The embedding job's figures: ``configs/embed.yaml``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os
from pathlib import Path
from typing import Literal

Allocator = Literal["jemalloc", "system"]

# No purging by time: freed pages stay with jemalloc for reuse until release_free_heap() purges them
# once per encoder call (the module docstring has why and the figures).
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


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


def local_allocator_env(allocator: Allocator) -> dict[str, str]:
    """:func:`allocator_env` for a process started from this one (``subprocess``, ``exec``): the node's
    ``${LD_PRELOAD}``, which Ray expands on the node, is expanded here from this process's environment."""
    env = allocator_env(allocator)
    if "LD_PRELOAD" in env:
        env["LD_PRELOAD"] = env["LD_PRELOAD"].replace("${LD_PRELOAD}", os.environ.get("LD_PRELOAD", "")).strip()
    return env


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


@functools.cache
def _mallctl():
    fn = ctypes.CDLL(None).mallctl
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS; False where unsupported.

    glibc: ``malloc_trim(0)``. jemalloc: purge every arena's unused dirty pages
    (``arena.<MALLCTL_ARENAS_ALL>.purge``), which :data:`JEMALLOC_CONF` otherwise never does.
    It walks every arena (once per 8192-text batch left the encode loop's speed unchanged): call it
    per large batch, not per item.
    """
    if active_allocator() == "jemalloc":
        return _mallctl()(b"arena.4096.purge", None, None, None, 0) == 0  # 4096: all arenas
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
