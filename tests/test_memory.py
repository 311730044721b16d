"""tessera.memory.release_free_heap hands freed heap pages back to the OS (what keeps encoder actors flat)."""

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
from tessera.memory import release_free_heap

def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

chunks = [bytes(2048) for _ in range(100_000)]
kept = chunks[::64]
del chunks
before = rss_mb()
trimmed = release_free_heap() if sys.argv[1] == "trim" else None
print(before, rss_mb(), trimmed, len(kept))
"""


def _run(mode: str) -> tuple[int, int, str]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], check=True, capture_output=True, text=True).stdout
    before, after, trimmed, _ = out.split()
    return int(before), int(after), trimmed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim, /proc/self/status")
def test_release_free_heap_returns_freed_pages_that_free_alone_keeps():
    before, after, trimmed = _run("keep")
    assert trimmed == "None" and after > 150, f"without a trim the freed chunks stay resident ({before} -> {after} MB)"
    before, after, trimmed = _run("trim")
    assert trimmed == "True"
    assert before > 150 and after < before - 120, f"trim gave back too little: {before} -> {after} MB"


JEMALLOC_SCRIPT = SCRIPT.replace("from tessera.memory import release_free_heap",
                                  "from tessera.memory import active_allocator, release_free_heap")
JEMALLOC_SCRIPT += "print(active_allocator())\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD, /proc/self/status")
def test_jemalloc_preload_runs_the_process_on_jemalloc_and_release_free_heap_purges_it():
    """What the encoder pools get from ``allocator: jemalloc``: the process runs on Ray's jemalloc, which
    (as configured) keeps the fragmented freed pages above until release_free_heap purges them."""
    import os

    from tessera.memory import active_allocator, allocator_env, jemalloc_library

    assert jemalloc_library(), "Ray ships ray/core/libjemalloc.so"
    assert allocator_env("system") == {}
    env = allocator_env("jemalloc")
    # Ray expands ${LD_PRELOAD} on the node; here it is done by hand
    env["LD_PRELOAD"] = env["LD_PRELOAD"].replace("${LD_PRELOAD}", os.environ.get("LD_PRELOAD", "")).strip()
    runs = {}
    for mode in ("keep", "trim"):
        out = subprocess.run([sys.executable, "-c", JEMALLOC_SCRIPT, mode], check=True, capture_output=True,
                             text=True, env={**os.environ, **env})
        assert "cannot be preloaded" not in out.stderr, out.stderr
        before, after, purged, _, allocator = out.stdout.split()
        assert allocator == "jemalloc"
        runs[mode] = int(before), int(after), purged
    before, after, purged = runs["keep"]
    assert purged == "None" and after > 150, f"jemalloc returned the pages without a purge ({before} -> {after} MB)"
    before, after, purged = runs["trim"]
    assert purged == "True" and before > 150 and after < before - 120, f"purge: {before} -> {after} MB"
    assert active_allocator() == "system"  # this test process was started without the preload
