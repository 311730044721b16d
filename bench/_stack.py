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

    SeaweedFS runs in its own session and is not counted: it is the store, not the workload."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._sample())
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


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
