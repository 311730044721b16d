"""The embedded Ray head: token auth on, dashboard on loopback, `ray job submit` works with the token only.

Starts its own head on other ports than the demo's, so it is marked slow (about 30 s) but runs in CI.
"""

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tessera.embedded.ray_head import EmbeddedRay
from tests.conftest import free_head_offsets

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def head(tmp_path_factory, embedded_s3):
    home = tmp_path_factory.mktemp("ray-head")
    offset = free_head_offsets()[0]
    h = EmbeddedRay(home, port_offset=offset, num_cpus=1)
    h.start(extra_env=embedded_s3.env())
    yield h
    h.stop()


def _submit(head, workdir, env_overrides, entry="python job.py"):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(env_overrides)
    return subprocess.run([RAY, "job", "submit", "--address", head.dashboard_url, "--working-dir", str(workdir),
                           "--", *entry.split()], env=env, capture_output=True, text=True, timeout=180)


def test_job_submit_needs_the_token(head, tmp_path, embedded_s3):
    (tmp_path / "job.py").write_text(
        "import os, ray\nray.init()\nprint('CPUS', ray.cluster_resources().get('CPU'))\n"
        "print('S3', os.environ.get('AWS_ENDPOINT_URL'))\n"
        # what Ray Train's state actor does: the state API from inside the cluster, address "auto"
        "@ray.remote(num_cpus=0)\ndef nodes():\n    from ray.util.state import list_nodes\n"
        "    return len(list_nodes(timeout=20))\n"
        "print('NODES', ray.get(nodes.remote()))\n")
    refused = _submit(head, tmp_path, {})
    assert refused.returncode != 0
    assert "uthentication" in refused.stdout + refused.stderr
    ok = _submit(head, tmp_path, {k: v for k, v in head.client_env().items() if k != "RAY_ADDRESS"})
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "CPUS 1.0" in ok.stdout and "NODES 1" in ok.stdout
    # the head hands the object store's endpoint to jobs, as an instance role would on a cluster
    assert f"S3 {embedded_s3.endpoint_url}" in ok.stdout


def test_token_file_private_and_dashboard_on_loopback(head):
    assert oct(head.token_file.stat().st_mode & 0o777) == "0o600"
    assert head.dashboard_url.startswith("http://127.0.0.1:")
    assert head.running()


def test_every_server_of_the_head_listens_on_loopback_only(head):
    """GCS, Ray client server, raylet, agents, metrics: nothing of the head listens beyond 127.0.0.1."""
    listening: dict[tuple[str, int], str] = {}
    for proc in head._processes():
        try:
            for conn in proc.net_connections("inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listening[(conn.laddr.ip, conn.laddr.port)] = proc.name()
        except psutil.NoSuchProcess:
            continue
    ports = {port for _, port in listening}
    assert {head.gcs_port, head.client_port, head.dashboard_port} <= ports, listening
    exposed = {addr: name for addr, name in listening.items()
               if addr[0] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")}
    assert not exposed, exposed


def test_a_driver_outside_the_cluster_connects_with_the_client_env(head):
    """``python -m jobs.<name>`` run directly (README): with env.sh's variables only, ``ray.init()``
    reaches the loopback-only head (it hung before: the driver rewrote 127.0.0.1 to the machine's IP)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(head.client_env())
    code = "import ray; ray.init(log_to_driver=False); print('CPUS', ray.cluster_resources().get('CPU'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "CPUS 1.0" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def test_a_head_whose_agent_port_is_held_is_refused_naming_the_port(tmp_path):
    """`ray start` succeeds with the dashboard agent's port held (by a test session's local Ray still
    exiting, say), and every `ray job submit` then fails with "No available agent": start() says which
    port is held instead (after waiting for it), and starts nothing."""
    import socket

    offset = free_head_offsets()[-1]
    h = EmbeddedRay(tmp_path, port_offset=offset, num_cpus=1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 52365 + offset))
        sock.listen()
        with pytest.raises(RuntimeError, match=f"{52365 + offset} \\(dashboard agent\\)"):
            h.start(ports_wait_s=1.5)
    assert not h.running() and not h._processes()


def test_another_dashboard_on_the_port_is_not_this_head(tmp_path):
    """A Ray without token auth (a local Ray a job started without env.sh) answers /api/version to any
    token: it was taken for the head, `tessera ray up` started nothing and wrote env.sh naming a GCS that
    nobody ran. Now the head must be running too; here the port is held and start says so."""
    import http.server
    import threading

    class Version(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    offset = free_head_offsets()[0]
    h = EmbeddedRay(tmp_path, port_offset=offset, num_cpus=1)
    h.ensure_token()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", h.dashboard_port), Version)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert not h.running()
        with pytest.raises(RuntimeError, match=f"ports in use by another process: {h.dashboard_port} .dashboard."):
            h.start(ports_wait_s=0)
    finally:
        server.shutdown()
        server.server_close()
    assert not h._processes()
