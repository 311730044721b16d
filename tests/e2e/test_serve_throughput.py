"""The recommender on a head started like `tessera ray up --serve-throughput`: Ray Serve's
throughput-optimized mode, where the Ingress replica serves HTTP on a port of its own (direct ingress).

Deployed with the real `serve deploy` CLI; the replica's address is read from the Serve controller's
target groups (what bench/serve.py --direct-ingress and a load balancer read), then used over HTTP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest
import requests

from tessera.cli import SERVE_THROUGHPUT_ENV
from tessera.embedded.ray_head import EmbeddedRay
from tests.conftest import free_head_offsets
from tests.serve.conftest import deploy_config, free_port, serve_cli, serve_deploy, wait_running

pytestmark = pytest.mark.slow

TARGETS = """
import json, ray
from ray.serve.context import _get_global_client
ray.init(log_to_driver=False)
groups = ray.get(_get_global_client()._controller.get_target_groups.remote())
print("TARGETS", json.dumps([{"app": g.app_name, "protocol": str(g.protocol),
                              "targets": [[t.ip, t.port] for t in g.targets]} for g in groups]))
"""


@pytest.fixture(scope="module")
def head(tmp_path_factory, embedded_s3):
    home = tmp_path_factory.mktemp("throughput-ray")
    h = EmbeddedRay(home, port_offset=free_head_offsets()[0], num_cpus=2)
    h.start(extra_env={**embedded_s3.env(), **SERVE_THROUGHPUT_ENV})
    yield h
    h.stop()


def test_direct_ingress_answers_on_a_loopback_replica_port(head, served_index, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(head.client_env())
    port = free_port()
    serve_deploy(deploy_config(served_index, port), head.dashboard_url, tmp_path, env=env)
    try:
        wait_running(head.dashboard_url, env=env)
        out = subprocess.run([sys.executable, "-c", TARGETS], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        groups = json.loads(out.stdout.split("TARGETS", 1)[1])
        [http] = [g for g in groups if g["app"] == "recommender" and g["protocol"].upper().endswith("HTTP")]
        [(ip, direct)] = http["targets"]
        assert ip == "127.0.0.1" and direct != port, http  # the replica itself, not the proxy
        listening = {c.laddr.ip for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == direct}
        assert listening == {"127.0.0.1"}, listening

        base = f"http://127.0.0.1:{direct}"
        version = requests.get(f"{base}/v1/version", timeout=30).json()
        assert version["index_uri"].rstrip("/") == served_index.rstrip("/"), version
        cold = requests.post(f"{base}/v1/recommend", json={"k": 5}, timeout=60)
        assert cold.status_code == 200 and cold.json()["cold_start"] is True and len(cold.json()["items"]) == 5
        bad = requests.post(f"{base}/v1/recommend", json={"k": 10_000}, timeout=30)
        assert bad.status_code == 422 and "k" in bad.text
        # the proxy keeps answering on the configured port
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
    finally:
        serve_cli("shutdown", "-y", dashboard_url=head.dashboard_url, env=env)
