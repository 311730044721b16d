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


JEMALLOC_SCRIPT = f"""
import sys, time
sys.path.insert(0, {str(PLATFORM)!r})
from tessera.memory import active_allocator, release_free_heap

def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

chunks = [bytes(2048) for _ in range(100_000)]
kept = chunks[::64]
del chunks
before = rss_mb()
trimmed = release_free_heap()
deadline = time.monotonic() + 10
while rss_mb() > before - 120 and time.monotonic() < deadline:  # jemalloc's background thread purges
    time.sleep(0.2)
print(active_allocator(), before, rss_mb(), trimmed, len(kept))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD, /proc/self/status")
def test_jemalloc_preload_runs_the_process_on_jemalloc_which_returns_freed_pages_by_itself():
    """What the encoder pools get from ``allocator: jemalloc``: the same fragmented heap as above
    shrinks without a trim (release_free_heap is a no-op there), and the process says it runs on it."""
    import os

    from tessera.memory import active_allocator, allocator_env, jemalloc_library

    assert jemalloc_library(), "Ray ships ray/core/libjemalloc.so"
    assert allocator_env("system") == {}
    env = allocator_env("jemalloc")
    # Ray expands ${LD_PRELOAD} on the node; here it is done by hand
    env["LD_PRELOAD"] = env["LD_PRELOAD"].replace("${LD_PRELOAD}", os.environ.get("LD_PRELOAD", "")).strip()
    out = subprocess.run([sys.executable, "-c", JEMALLOC_SCRIPT], check=True, capture_output=True, text=True,
                         env={**os.environ, **env})
    assert "cannot be preloaded" not in out.stderr, out.stderr
    allocator, before, after, trimmed, _ = out.stdout.split()
    assert allocator == "jemalloc" and trimmed == "False"
    before, after = int(before), int(after)
    assert before > 150 and after < before - 120, f"jemalloc kept the freed pages: {before} -> {after} MB"
    assert active_allocator() == "system"  # this test process was started without the preload
