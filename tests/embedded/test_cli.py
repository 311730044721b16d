"""`tessera` CLI refusals that need no running service."""

import socket
import subprocess
import sys

import pytest

from tessera.embedded.prometheus import EmbeddedPrometheus


def tessera(home, *args):
    import os

    env = {**os.environ, "TESSERA_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "tessera.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_ray_up_without_the_store_s_credentials_is_refused(tmp_path):
    """The head hands the store's credentials to every job; started without them, jobs' S3 clients went to
    AWS. `make ray-up` starts the store first; `tessera ray up` alone says so, and starts nothing."""
    done = tessera(tmp_path, "ray", "up", "--port-offset", "1900")
    assert done.returncode == 1 and "start the store first" in done.stderr, done.stderr
    assert not (tmp_path / "ray").exists() or not any((tmp_path / "ray").iterdir())


def test_prometheus_up_on_a_port_another_server_holds_is_skipped(tmp_path):
    """Prometheus is optional: a port already in use (Cockpit, another Prometheus) skips it instead of
    failing `make demo`."""
    if EmbeddedPrometheus.binary() is None:
        pytest.skip("prometheus is not installed here")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        done = tessera(tmp_path, "prometheus", "up", "--port", str(port))
    assert done.returncode == 0 and f"port {port} is in use" in done.stdout, done.stdout + done.stderr
