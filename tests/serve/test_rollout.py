"""A new version rolled out by changing user_config and running `serve deploy` again, under load."""

import random
import threading
import time

import pytest
import requests

from tessera.index_job import run_index_job
from tessera.index_job.seeded_bundle import seeded_bundle
from tessera.storage import join_uri
from tests.conftest import TEST_ROOT
from tests.index_job.conftest import job_config
from tests.serve.conftest import APP, deploy_config, serve_deploy, wait_running


@pytest.fixture(scope="module")
def second_version(sample_embeddings, storage, ray_session):
    """Another model (seeded towers, untrained ranker) and its index: a different (model, index) pair."""
    bundle_uri = f"{TEST_ROOT}/served/models/seeded-serve"
    seeded_bundle(sample_embeddings, version="seeded-serve", seed=3, out_dim=16).save(storage, bundle_uri)
    out = f"{TEST_ROOT}/served/index"
    manifest = run_index_job(job_config(bundle_uri, out, build={"num_cpus": 0.5}, vectors={"num_cpus": 0.25}))
    return join_uri(out, manifest.index_version)


@pytest.mark.slow
def test_rollout_under_load_drops_nothing_and_never_mixes_versions(app_url, served_index, second_version, storage,
                                                                    dashboard_url, serve_port, tmp_path):
    from ray import serve

    from tessera.serving import VersionRef

    v1, v2 = (VersionRef.resolve(storage, u) for u in (served_index, second_version))
    pairs = {(v1.model_version, v1.index_version), (v2.model_version, v2.index_version)}
    assert len(pairs) == 2
    users = [f"user-{i:08d}" for i in range(40)]
    results: list[tuple[float, int, tuple | None]] = []
    stop = threading.Event()

    def load(seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as s:
            while not stop.is_set():
                r = s.post(f"{app_url}/v1/recommend", json={"user_id": rng.choice(users), "k": 5}, timeout=60)
                body = r.json() if r.status_code == 200 else None
                results.append((time.monotonic(), r.status_code,
                                (body["model_version"], body["index_version"]) if body else None))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        serve_deploy(deploy_config(second_version, serve_port), dashboard_url, tmp_path)
        wait_running(dashboard_url)
        switched = time.monotonic()
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join()

    statuses = [s for _, s, _ in results]
    assert statuses and set(statuses) == {200}, f"{len([s for s in statuses if s != 200])} failed: {set(statuses)}"
    seen = [p for _, _, p in results]
    assert set(seen) <= pairs  # each answer from one version end to end
    assert (v1.model_version, v1.index_version) in seen and (v2.model_version, v2.index_version) in seen
    after = [p for t, _, p in results if t > switched + 1.0]
    assert after and set(after) == {(v2.model_version, v2.index_version)}
    # reconfigured in place: the running QueryEncoder replica loaded the new version beside the old one
    loaded = serve.get_deployment_handle("QueryEncoder", APP).loaded_versions.remote().result()
    assert set(loaded) == {served_index, second_version}

    serve_deploy(deploy_config(served_index, serve_port), dashboard_url, tmp_path)  # back to the session's version
    wait_running(dashboard_url)
