"""What a benchmark brings up: its own SeaweedFS (on ports 30000-30009, state in .tessera/bench)
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

BENCH_S3_PORT_BASE = 30000


@contextlib.contextmanager
def bench_stack(num_cpus: int | None = None):
    """Yield the S3 connection with a local Ray running; the env carries the S3 settings to workers."""
    home = state_dir() / "bench"
    s3 = EmbeddedS3(home, ports=S3Ports.block(BENCH_S3_PORT_BASE))
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
    time: reading smaps is slower and costs CPU, so 0 turns it off), and ``top_at_peak`` names the
    largest processes at the RSS peak. ``cpu_by_process()`` is the CPU time each process (by command
    line) spent inside the window, the sampler's own thread included. The bench's own SeaweedFS
    server is a child process too and is counted (~200 MB, growing with the data it stores);
    ``peak_without_storage_mb`` is the same peak without it (on a cluster the object store is S3)."""

    def __init__(self, interval_s: float = 0.25, uss_every: int = 4):
        self.interval_s = interval_s
        self.uss_every = uss_every
        self.peak_bytes = 0
        self.peak_without_storage_bytes = 0
        self.peak_uss_bytes = 0
        self.top_at_peak: list[tuple[str, float]] = []
        self._cpu: dict[int, list] = {}  # pid -> [name, cpu seconds at first sight, latest]
        self.sampler_cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _processes(self) -> list[psutil.Process]:
        me = psutil.Process()
        return [me, *me.children(recursive=True)]

    def _sample(self) -> int:
        total, storage, sizes = 0, 0, []
        for p in self._processes():
            with contextlib.suppress(psutil.Error):
                rss = p.memory_info().rss
                total += rss
                cmd = p.cmdline()
                name = " ".join(cmd)[:60].strip() or p.name()
                sizes.append((rss, name))
                if cmd and Path(cmd[0]).name == "weed":  # the bench's SeaweedFS: the object store, S3 on a cluster
                    storage += rss
                t = p.cpu_times()
                cpu = t.user + t.system
                if p.pid not in self._cpu:
                    # a process born inside the window counts from 0, one alive at the start from now
                    born_inside = bool(self._cpu) and p.create_time() > self._t0
                    self._cpu[p.pid] = [name, 0.0 if born_inside else cpu, cpu]
                entry = self._cpu[p.pid]
                entry[2] = cpu
                if name != "ray::IDLE":  # a Ray worker is named by the task or actor it runs last
                    entry[0] = name
        self.peak_without_storage_bytes = max(self.peak_without_storage_bytes, total - storage)
        if total > self.peak_bytes:
            top = sorted(sizes, key=lambda t: -t[0])[:6]
            self.top_at_peak = [(name, round(rss / 2**20, 1)) for rss, name in top]
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
            if self.uss_every and n % self.uss_every == 0:
                self.peak_uss_bytes = max(self.peak_uss_bytes, self._sample_uss())
            n += 1
            self.sampler_cpu_s = time.thread_time()
            time.sleep(self.interval_s)

    def cpu_by_process(self, top: int = 8) -> dict:
        """CPU seconds spent inside the window: in all, and by process (the ``top`` largest, by command
        line; processes of the same command line summed, as ``[name, cpu seconds, processes]``). Time a
        process spent after the last sample (at most ``interval_s``) or in one that lived less than
        ``interval_s`` is missed. A Ray worker is named by the last task it was seen running."""
        by: dict[str, list] = {}
        for name, first, last in self._cpu.values():
            entry = by.setdefault(name, [0.0, 0])
            entry[0] += last - first
            entry[1] += 1
        ranked = sorted(by.items(), key=lambda kv: -kv[1][0])
        return {"cpu_s_total": round(sum(v[0] for v in by.values()), 1), "sampler_cpu_s": round(self.sampler_cpu_s, 2),
                "cpu_s_by_process": [(name, round(v[0], 1), v[1]) for name, v in ranked[:top]]}

    def __enter__(self) -> "PeakRSS":
        self._t0 = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return round(self.peak_bytes / 2**20, 1)

    @property
    def peak_without_storage_mb(self) -> float:
        return round(self.peak_without_storage_bytes / 2**20, 1)

    @property
    def peak_uss_mb(self) -> float:
        return round(self.peak_uss_bytes / 2**20, 1)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
