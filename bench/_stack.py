"""What a benchmark brings up: its own SeaweedFS (ports shifted by 25000, state in .tessera/bench)
and a local Ray, both torn down at exit. Benchmarks run standalone from the repo root."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from pathlib import Path

import psutil

from tessera.embedded.seaweedfs import EmbeddedS3, S3Ports
from tessera.embedded.state import state_dir, write_private

BENCH_PORT_OFFSET = 25000


@contextlib.contextmanager
def bench_stack(num_cpus: int | None = None):
    """Yield the S3 connection with a local Ray running; the env carries the S3 settings to workers."""
    home = state_dir() / "bench"
    s3 = EmbeddedS3(home, ports=S3Ports.offset(BENCH_PORT_OFFSET))
    conn = s3.start()
    os.environ.update(conn.env())
    token = home / "ray_auth_token"
    write_private(token, secrets.token_hex(32))
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    os.environ.pop("RAY_ADDRESS", None)
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield conn
    finally:
        ray.shutdown()
        s3.stop()


class PeakRSS:
    """Samples the summed RSS of this process and its descendants (Ray workers included) in a thread.

    RSS counts pages shared between processes (Ray's object store mapping, shared libraries) once per
    process; ``peak_uss_mb`` sums each process's unique pages instead (sampled every ``uss_every``-th
    time: reading smaps is slower), and ``top_at_peak`` names the largest processes at the RSS peak.
    The bench's own SeaweedFS server is a child process too and is counted (~200 MB)."""

    def __init__(self, interval_s: float = 0.25, uss_every: int = 4):
        self.interval_s = interval_s
        self.uss_every = uss_every
        self.peak_bytes = 0
        self.peak_uss_bytes = 0
        self.top_at_peak: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _processes(self) -> list[psutil.Process]:
        me = psutil.Process()
        return [me, *me.children(recursive=True)]

    def _sample(self) -> int:
        total, sizes = 0, []
        for p in self._processes():
            with contextlib.suppress(psutil.Error):
                rss = p.memory_info().rss
                total += rss
                sizes.append((rss, p))
        if total > self.peak_bytes:
            top = sorted(sizes, key=lambda t: -t[0])[:6]
            names = []
            for rss, p in top:
                with contextlib.suppress(psutil.Error):
                    names.append((" ".join(p.cmdline())[:60] or p.name(), round(rss / 2**20, 1)))
            self.top_at_peak = names
        return total

    def _sample_uss(self) -> int:
        total = 0
        for p in self._processes():
            with contextlib.suppress(psutil.Error):
                total += p.memory_full_info().uss
        return total

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._sample())
            if n % self.uss_every == 0:
                self.peak_uss_bytes = max(self.peak_uss_bytes, self._sample_uss())
            n += 1
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return round(self.peak_bytes / 2**20, 1)

    @property
    def peak_uss_mb(self) -> float:
        return round(self.peak_uss_bytes / 2**20, 1)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
