"""The recommender app deployed from ``serve_apps/recommender.yaml`` with the real ``serve deploy`` CLI
into the session's Ray, reached over real HTTP on loopback.

Package-scoped: Serve's replicas hold a CPU of the 2-CPU test Ray, so the app is shut down as soon
as the tests of this folder are done.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
APP = "recommender"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy_config(index_uri: str, port: int, **args) -> dict:
    """``recommender.yaml`` as shipped, pointed at ``index_uri`` and ``port``, with test-sized limits."""
    config = yaml.safe_load((ROOT / "serve_apps" / "recommender.yaml").read_text())
    config["http_options"]["port"] = port
    [app] = config["applications"]
    assert "index_uri" not in app["args"]  # the version is user_config only: a rollout reconfigures in place
    app["args"].update({"max_k": 50, "max_body_bytes": 1_000_000, "rollout_retry_s": 5.0, **args})
    for d in app["deployments"]:
        d["user_config"] = {"index_uri": index_uri}
        d["ray_actor_options"]["num_cpus"] = 0.2
        d["autoscaling_config"]["max_replicas"] = 1  # 2 CPUs: one replica each
    return config


def serve_cli(*args: str, dashboard_url: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real ``serve`` CLI against ``dashboard_url`` (``env``: the client's environment, its token)."""
    serve = str(Path(sys.executable).with_name("serve"))
    return subprocess.run([serve, *args, "--address", dashboard_url], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ) if env is None else env, check=False)


def serve_deploy(config: dict, dashboard_url: str, tmp: Path, env: dict | None = None) -> None:
    path = tmp / f"recommender-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    done = serve_cli("deploy", str(path), dashboard_url=dashboard_url, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


def wait_running(dashboard_url: str, timeout_s: float = 180, env: dict | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        status = serve_cli("status", dashboard_url=dashboard_url, env=env).stdout
        app = yaml.safe_load(status or "{}").get("applications", {}).get(APP, {})
        if app.get("status") == "RUNNING" and all(d.get("status") == "HEALTHY"
                                                  for d in app.get("deployments", {}).values()):
            return
        if app.get("status") == "DEPLOY_FAILED":
            raise AssertionError(f"deploy failed:\n{status[-3000:]}")
        time.sleep(1)
    raise AssertionError(f"app not running after {timeout_s} s:\n{status[-3000:]}")


def replicas(ray, deployment: str) -> list[tuple[str, str]]:
    """``(name, namespace)`` of the live replica actors of ``deployment``."""
    return sorted((a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"])


@pytest.fixture(scope="package")
def serve_port() -> int:
    return free_port()


@pytest.fixture(scope="package")
def app_url(ray_session, served_index, dashboard_url, serve_port, tmp_path_factory):
    from ray import serve

    serve_deploy(deploy_config(served_index, serve_port), dashboard_url, tmp_path_factory.mktemp("serve"))
    wait_running(dashboard_url)
    url = f"http://127.0.0.1:{serve_port}"
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    yield url
    serve.shutdown()
