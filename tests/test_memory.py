"""tessera.memory.release_free_heap hands freed heap pages back to the OS (what keeps encoder actors flat)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PLATFORM = Path(__file__).resolve().parents[1] / "platform"

# ~200 MB in 2 KB malloc'd chunks, every 64th kept: the freed ones sit between live chunks, where glibc's
# free() keeps them (it only gives back the top of the heap by itself)
SCRIPT = f"""
import sys
sys.path.insert(0, {str(PLATFORM)!r})
from tessera.memory import active_allocator, release_free_heap

def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

chunks = [bytes(2048) for _ in range(100_000)]
kept = chunks[::64]
del chunks
before = rss_mb()
trimmed = release_free_heap() if sys.argv[1] == "trim" else None
print(before, rss_mb(), trimmed, len(kept), active_allocator())
"""


def _run(mode: str, env: dict[str, str] | None = None) -> tuple[int, int, str, str]:
    """(RSS before, RSS after, what release_free_heap returned, the allocator) of SCRIPT in a new process."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], check=True, capture_output=True, text=True,
                         env=None if env is None else {**os.environ, **env})
    assert "cannot be preloaded" not in out.stderr, out.stderr
    before, after, trimmed, _, allocator = out.stdout.split()
    return int(before), int(after), trimmed, allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim, /proc/self/status")
def test_release_free_heap_returns_freed_pages_that_free_alone_keeps():
    before, after, trimmed, _ = _run("keep")
    assert trimmed == "None" and after > 150, f"without a trim the freed chunks stay resident ({before} -> {after} MB)"
    before, after, trimmed, allocator = _run("trim")
    assert trimmed == "True" and allocator == "system"
    assert before > 150 and after < before - 120, f"trim gave back too little: {before} -> {after} MB"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD, /proc/self/status")
def test_jemalloc_preload_runs_the_process_on_jemalloc_and_release_free_heap_purges_it():
    """What the encoder pools get from ``allocator: jemalloc``: the process runs on Ray's jemalloc, which
    (as configured) keeps the fragmented freed pages above until release_free_heap purges them."""
    from tessera.memory import active_allocator, allocator_env, jemalloc_library, local_allocator_env

    assert jemalloc_library(), "Ray ships ray/core/libjemalloc.so"
    assert allocator_env("system") == {}
    assert "${LD_PRELOAD}" in allocator_env("jemalloc")["LD_PRELOAD"]  # Ray expands it on the node
    env = local_allocator_env("jemalloc")
    before, after, purged, allocator = _run("keep", env)
    assert allocator == "jemalloc"
    assert purged == "None" and after > 150, f"jemalloc returned the pages without a purge ({before} -> {after} MB)"
    before, after, purged, allocator = _run("trim", env)
    assert allocator == "jemalloc"
    assert purged == "True" and before > 150 and after < before - 120, f"purge: {before} -> {after} MB"
    assert active_allocator() == "system"  # this test process was started without the preload
