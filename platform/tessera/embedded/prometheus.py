"""Embedded Prometheus: the machine's ``prometheus`` binary (Debian's package) scraping one Ray head.

Ray's head keeps the list of every node's metrics endpoint in ``prom_metrics_service_discovery.json``
in its session folder and rewrites it as nodes come and go; the config written here scrapes exactly
that file (``file_sd_configs``), as ``ops/prometheus.yml`` does on a cluster. For the embedded head
the file is under the head's own temp dir (``<temp_dir>/session_latest/``, see
:attr:`tessera.embedded.ray_head.EmbeddedRay.temp_dir`), not ``/tmp/ray``. Prometheus listens on
127.0.0.1 only and keeps its config, pid, log and TSDB under ``<home>/prometheus/``.

Prometheus is optional: :meth:`EmbeddedPrometheus.binary` is None when it is not installed
(``apt-get install prometheus``), and the ``tessera prometheus up`` command then says so and skips.

Example::

    prom = EmbeddedPrometheus.for_head(Path(".tessera"), EmbeddedRay(Path(".tessera")))
    prom.start()                                   # idempotent: reuses a running server
    prom.query('ray_node_cpu_utilization')         # Prometheus' /api/v1/query result list
    prom.stop()
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from tessera.embedded.ray_head import EmbeddedRay

# The file Ray's head writes in its session folder (ray._private.ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE)
DISCOVERY_FILE = "prom_metrics_service_discovery.json"
DEFAULT_PORT = 9090


class EmbeddedPrometheus:
    """A Prometheus server scraping the Ray nodes listed in ``discovery_file``.

    Args:
        home: the state folder; Prometheus' files go to ``home/prometheus``.
        discovery_file: Ray's service discovery file (need not exist yet: Prometheus re-reads it).
        port: HTTP port on 127.0.0.1 (UI and ``/api/v1``).
        scrape_interval_s: how often every target is scraped (Ray's agents refresh about every 10 s).
    """

    def __init__(self, home: Path, discovery_file: Path, port: int = DEFAULT_PORT, scrape_interval_s: int = 10):
        self.root = Path(home) / "prometheus"
        self.discovery_file = Path(discovery_file)
        self.port = port
        self.scrape_interval_s = scrape_interval_s

    @classmethod
    def for_head(cls, home: Path, head: EmbeddedRay, **kwargs) -> EmbeddedPrometheus:
        """The Prometheus of an embedded head: its current session's discovery file (``session_latest``
        follows a restarted head)."""
        return cls(home, Path(head.temp_dir) / "session_latest" / DISCOVERY_FILE, **kwargs)

    @staticmethod
    def binary() -> str | None:
        """The ``prometheus`` executable on PATH, or None when it is not installed."""
        return shutil.which("prometheus")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_file(self) -> Path:
        return self.root / "prometheus.yml"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def pid_file(self) -> Path:
        return self.root / "prometheus.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "prometheus.log"

    def config(self) -> dict:
        """The scrape config: one job, ``ray``, over the nodes of the discovery file."""
        interval = f"{self.scrape_interval_s}s"
        return {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [{
                "job_name": "ray",
                "file_sd_configs": [{"files": [str(self.discovery_file)], "refresh_interval": interval}],
            }],
        }

    def pid(self) -> int | None:
        """Pid of the server started from this folder, or None (a stale pid file naming another
        process does not count)."""
        import psutil

        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = psutil.Process(pid).cmdline()
        except (OSError, ValueError, psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return pid if f"--config.file={self.config_file}" in cmdline else None

    def ready(self) -> bool:
        """True when the server answers ``/-/ready``."""
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=3) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout_s: float = 60.0) -> str:
        """Start the server (or reuse the running one) and return its URL.

        Raises:
            FileNotFoundError: ``prometheus`` is not installed.
            RuntimeError / TimeoutError: it exited or did not become ready (the log's tail is included).
        """
        if self.pid() is not None:
            # ours and alive: it may still be replaying its write-ahead log on a loaded machine; one that
            # never answers is replaced (a second server beside it failed on the port and the data folder's
            # lock, and the pid file then named that dead one, so nothing could stop the first)
            if self._wait_ready(None, time.monotonic() + timeout_s):
                return self.url
            self.stop()
        binary = self.binary()
        if binary is None:
            raise FileNotFoundError("prometheus is not on PATH (Debian: apt-get install prometheus)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text("# written by tessera (tessera.embedded.prometheus); rewritten on every start\n"
                                    + yaml.safe_dump(self.config(), sort_keys=False))
        cmd = [binary, f"--config.file={self.config_file}", f"--storage.tsdb.path={self.data_dir}",
               f"--web.listen-address=127.0.0.1:{self.port}"]
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.pid_file.write_text(str(proc.pid))
        if self._wait_ready(proc, time.monotonic() + timeout_s):
            return self.url
        self.stop()
        raise TimeoutError(f"prometheus not ready on {self.url} within {timeout_s:.0f}s:\n{self._log_tail()}")

    def _wait_ready(self, proc: subprocess.Popen | None, deadline: float) -> bool:
        """Poll ``/-/ready`` until ``deadline``; False when it never answered or the server is gone.

        Raises:
            RuntimeError: ``proc`` (a server this call started) exited; the log's tail is included.
        """
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with code {proc.returncode}:\n{self._log_tail()}")
            if proc is None and self.pid() is None:
                return False
            if self.ready():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)

    def stop(self, timeout_s: float = 15.0) -> bool:
        """SIGTERM (SIGKILL after ``timeout_s``); returns True if a server was running."""
        import psutil

        pid = self.pid()
        self.pid_file.unlink(missing_ok=True)
        if pid is None:
            return False
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except psutil.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=timeout_s)
        return True

    def query(self, promql: str) -> list[dict]:
        """Instant query through Prometheus' HTTP API: the ``data.result`` list."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {body}")
        return body["data"]["result"]

    def _log_tail(self, n: int = 3000) -> str:
        return self.log_file.read_text(errors="replace")[-n:] if self.log_file.exists() else ""
