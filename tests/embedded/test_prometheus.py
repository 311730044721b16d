"""Prometheus (the machine's ``prometheus``, Debian's package) scraping an embedded Ray head, driven
through the ``tessera`` CLI as ``make demo`` and ``make ray-down`` drive it.

A head of its own (shifted ports, its own temp dir, as ``make ray-up`` starts one) and a driver that
sets one of Tessera's gauges; Prometheus must list every node of the head's service discovery file
as up and return both Ray's and Tessera's series through its own HTTP API; ``tessera ray down`` stops
it with the head. Skipped where Prometheus is not installed (``make demo`` skips it there too).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tessera.embedded.prometheus import EmbeddedPrometheus
from tessera.embedded.ray_head import EmbeddedRay
from tests.conftest import free_head_offsets

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(EmbeddedPrometheus.binary() is None,
                       reason="prometheus is not installed (Debian: apt-get install prometheus)"),
]
RAY = str(Path(sys.executable).parent / "ray")
GAUGE_JOB = """\
import time
import ray
from tessera.train.worker import EpochGauges

ray.init()
EpochGauges("prom-check").record("fused", loss=0.25, samples_per_s=123.0)
print("gauge set", flush=True)
time.sleep(300)  # stopped by the test once Prometheus has the series
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tessera(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TESSERA_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "tessera.cli", *args], env=env, capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("prom-home")
    offset = free_head_offsets()[0]
    head = EmbeddedRay(home, port_offset=offset, num_cpus=1)
    head.start()
    yield home, head, offset
    EmbeddedPrometheus.for_head(home, head).stop()  # both no-ops when the test got as far as `ray down`
    head.stop()


def wait_for(prom: EmbeddedPrometheus, promql: str, check, timeout_s: float = 120.0) -> list[dict]:
    deadline, result = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        result = prom.query(promql)
        if result and check(result):
            return result
        time.sleep(2)
    raise AssertionError(f"{promql}: {result} after {timeout_s:.0f}s")


def test_prometheus_scrapes_the_head_and_stops_with_it(stack, tmp_path):
    home, head, offset = stack
    port = free_port()
    t0 = time.monotonic()
    up = tessera(home, "prometheus", "up", "--port", str(port))
    assert up.returncode == 0, up.stdout + up.stderr
    prom = EmbeddedPrometheus.for_head(home, head, port=port)
    assert prom.url in up.stdout
    pid = prom.pid()
    assert pid is not None and prom.data_dir.is_dir()
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}
    assert listening == {("127.0.0.1", port)}

    # every node endpoint Ray lists for this head is scraped, and Ray's own series come through
    def listed() -> set[str]:  # Ray rewrites the file as the head's endpoints register
        return {t for group in json.loads(prom.discovery_file.read_text()) for t in group["targets"]}

    wait_for(prom, 'up{job="ray"}', lambda r: {s["metric"]["instance"] for s in r if s["value"][1] == "1"} == listed())
    targets = listed()
    assert len(targets) == 3  # the head's metrics agent, autoscaler and dashboard
    wait_for(prom, "ray_node_cpu_utilization", lambda r: len(r) >= 1)

    # one of Tessera's gauges, set in a driver of this head, under the name the Grafana dashboard queries
    script = tmp_path / "gauge_job.py"
    script.write_text(GAUGE_JOB)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({k: v for k, v in head.client_env().items() if k != "RAY_ADDRESS"})
    sid = f"prom-{os.getpid()}"
    submit = subprocess.run([RAY, "job", "submit", "--submission-id", sid, "--no-wait", "--", "python", str(script)],
                            env=env, capture_output=True, text=True, timeout=180)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    try:
        series = wait_for(prom, 'ray_tessera_train_samples_per_second{version="prom-check"}',
                          lambda r: r[0]["value"][1] == "123")
    finally:
        subprocess.run([RAY, "job", "stop", sid], env=env, capture_output=True, timeout=60)
    assert series[0]["metric"]["stage"] == "fused"
    print(f"\n[prometheus] {len(targets)} targets up, Ray and Tessera series queried, "
          f"{time.monotonic() - t0:.1f}s from `tessera prometheus up`")

    status = tessera(home, "prometheus", "status", "--port", str(port))
    assert status.returncode == 0 and prom.url in status.stdout
    down = tessera(home, "ray", "down", "--port-offset", str(offset))
    assert down.returncode == 0 and "Prometheus stopped" in down.stdout, down.stdout + down.stderr
    assert not psutil.pid_exists(pid) and not prom.ready() and not head.running()
    assert tessera(home, "prometheus", "status", "--port", str(port)).returncode == 1
