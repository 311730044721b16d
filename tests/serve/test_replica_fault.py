"""A Serve replica killed under a bounded load: (almost) no failed request, and service back within 10 s.

The deployment under test runs two replicas (as it should in production: one replica alone means a
reload of its model before anything is answered again); the Ingress retries a stage call whose
replica died on the other one, and Serve's controller replaces the dead replica.
"""

import threading
import time

import pytest
import requests

from tests.serve.conftest import deploy_config, replicas, serve_deploy, wait_running


@pytest.fixture
def two_replicas_of(served_index, dashboard_url, serve_port, tmp_path):
    """Redeploy with two replicas of one deployment (config only: the others keep running), then back."""
    def redeploy(deployment: str | None) -> None:
        config = deploy_config(served_index, serve_port)
        for d in config["applications"][0]["deployments"]:
            if d["name"] == deployment:
                d["autoscaling_config"].update({"min_replicas": 2, "max_replicas": 2})
                d["ray_actor_options"]["num_cpus"] = 0.1
        serve_deploy(config, dashboard_url, tmp_path)
        wait_running(dashboard_url)

    yield redeploy
    redeploy(None)


@pytest.mark.slow
@pytest.mark.parametrize("deployment", ["Ranker", "QueryEncoder"])
def test_replica_killed_under_load(app_url, ray_session, deployment, two_replicas_of):
    ray = ray_session
    two_replicas_of(deployment)
    deadline = time.monotonic() + 120
    while len(replicas(ray, deployment)) != 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert len(replicas(ray, deployment)) == 2
    users = [f"user-{i:08d}" for i in range(40)]
    results: list[tuple[float, int]] = []
    stop = threading.Event()

    def load(offset: int) -> None:
        with requests.Session() as s:
            i = offset
            while not stop.is_set():
                r = s.post(f"{app_url}/v1/recommend", json={"user_id": users[i % len(users)], "k": 5}, timeout=60)
                results.append((time.monotonic(), r.status_code))
                i += 1
                time.sleep(0.02)  # bounded: 4 clients at most ~50 requests/s each

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        victim = replicas(ray, deployment)[0]
        ray.kill(ray.get_actor(victim[0], namespace=victim[1]), no_restart=True)
        killed = time.monotonic()
        deadline = killed + 90
        while time.monotonic() < deadline:  # Serve's controller starts a replacement replica
            now = replicas(ray, deployment)
            if len(now) == 2 and victim not in now:
                break
            time.sleep(0.5)
        replaced = time.monotonic() - killed
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join()

    total = len(results)
    failed = [s for _, s in results if s != 200]
    error_rate = len(failed) / total
    ok_times = sorted(t for t, s in results if s == 200)
    after = [t for t in ok_times if t > killed]
    # recovery: the longest stretch without a successful answer from the kill on
    gaps = [b - a for a, b in zip([killed, *after], after, strict=False)]
    recovery = max(gaps) if gaps else float("inf")
    print(f"{deployment}: {total} requests, {len(failed)} failed ({error_rate:.4%}), longest gap without an "
          f"answer after the kill {recovery:.2f} s, replica replaced after {replaced:.1f} s")
    assert total > 50 and error_rate <= 0.005, (total, failed)
    assert recovery <= 10.0
    assert ok_times[-1] > killed + 3  # still answering at the end
