"""A new version rolled out by changing user_config and running `serve deploy` again, under load."""

import random
import threading
import time
import uuid

import pytest
import requests
import yaml

from tessera.index_job import run_index_job
from tessera.index_job.seeded_bundle import seeded_bundle
from tessera.storage import join_uri
from tests.conftest import TEST_ROOT
from tests.index_job.conftest import job_config
from tests.serve.conftest import APP, deploy_config, replicas, serve_cli, serve_deploy, wait_running


@pytest.fixture(scope="module")
def second_version(sample_embeddings, storage, ray_session):
    """Another model (seeded towers, untrained ranker) and its index: a different (model, index) pair."""
    bundle_uri = f"{TEST_ROOT}/served/models/seeded-serve"
    seeded_bundle(sample_embeddings, version="seeded-serve", seed=3, out_dim=16).save(storage, bundle_uri)
    out = f"{TEST_ROOT}/served/index"
    manifest = run_index_job(job_config(bundle_uri, out, build={"num_cpus": 0.5}, vectors={"num_cpus": 0.25}))
    return join_uri(out, manifest.index_version)


@pytest.mark.slow
def test_a_stage_loading_a_version_it_lacks_keeps_answering_the_ones_it_has(app_url, served_index, second_version):
    """A replica added during a rollout starts on the new version and is sent the current one's requests (or
    the reverse): it loads the version it lacks while its other requests go on. The load used to run in the
    batch handler, one batch at a time, so every request on the replica waited for it. (First in this
    module: later tests leave the second version loaded.)"""
    from ray import serve

    from tessera.serving.query import UserQuery

    encoder = serve.get_deployment_handle("QueryEncoder", APP)
    assert second_version not in encoder.loaded_versions.remote().result()  # (one replica in the test app)
    done: list[str] = []

    def call(name, uri):
        [out] = encoder.encode_users.remote(uri, [UserQuery("user-00000004")]).result(timeout_s=300)
        assert out.vector is not None
        done.append(name)

    slow = threading.Thread(target=call, args=("new version", second_version))
    slow.start()
    time.sleep(0.3)
    call("current version", served_index)
    slow.join()
    assert done == ["current version", "new version"]


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
                sent = time.monotonic()  # a request sent before the switch may answer from v1 after it
                r = s.post(f"{app_url}/v1/recommend", json={"user_id": rng.choice(users), "k": 5}, timeout=60)
                body = r.json() if r.status_code == 200 else None
                results.append((sent, r.status_code,
                                (body["model_version"], body["index_version"]) if body else None))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        serve_deploy(deploy_config(second_version, serve_port), dashboard_url, tmp_path)
        wait_running(dashboard_url)
        version = wait_version(app_url, lambda v: v["index_uri"] == second_version and v["rollout"] is None)
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

    assert version["index_version"] == v2.index_version and version["model_version"] == v2.model_version

    serve_deploy(deploy_config(served_index, serve_port), dashboard_url, tmp_path)  # back to the session's version
    wait_running(dashboard_url)
    wait_version(app_url, lambda v: v["index_uri"] == served_index and v["rollout"] is None)


def wait_version(app_url: str, done, timeout_s: float = 120) -> dict:
    """``GET /v1/version`` until ``done(answer)``: a rollout switches once every stage has the version loaded,
    a little after ``serve deploy`` reports the app RUNNING."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = requests.get(f"{app_url}/v1/version", timeout=10).json()
        if done(answer):
            return answer
        assert time.monotonic() < deadline, answer
        time.sleep(0.2)


@pytest.fixture
def broken_version(served_index, storage):
    """The session's index copied with one byte of a shard's data flipped (ScaNN files or brute-force
    vectors): its manifests resolve, the QueryEncoder and Ranker load it, the Retriever refuses it (checksum).
    A copy of its own for each test (one test repairs its copy)."""
    out = f"{TEST_ROOT}/served/index-broken-{uuid.uuid4().hex[:8]}"
    flipped = None
    for uri in storage.list_files(served_index):
        data = storage.read_bytes(uri)
        rel = uri[len(served_index):].lstrip("/")
        if flipped is None and ("/scann/" in uri or uri.endswith("/vectors.npy")) and len(data) > 100:
            data = data[:50] + bytes([data[50] ^ 0xFF]) + data[51:]
            flipped = rel
        storage.write_bytes(join_uri(out, rel), data)
    assert flipped, "no shard data file in the served index"
    return out, flipped


@pytest.mark.slow
def test_a_rollout_the_stages_cannot_load_keeps_the_current_version_answering(
        app_url, served_index, broken_version, storage, dashboard_url, serve_port, tmp_path, ray_session):
    from tessera.serving import VersionRef

    broken_version, flipped = broken_version
    v1 = VersionRef.resolve(storage, served_index)
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def load() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                r = s.post(f"{app_url}/v1/recommend", json={"user_id": "user-00000004", "k": 5}, timeout=60)
                results.append((r.status_code, r.json()["index_version"] if r.status_code == 200 else r.text))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        serve_deploy(deploy_config(broken_version, serve_port), dashboard_url, tmp_path)
        wait_running(dashboard_url)  # the replicas stay up: a failed load is reported, not raised
        version = wait_version(app_url, lambda v: (v["rollout"] or {}).get("state") == "failed")
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert results and {status for status, _ in results} == {200}, [r for r in results if r[0] != 200][:3]
    assert {index for _, index in results} == {v1.index_version}
    assert version["index_uri"] == served_index and version["rollout"]["index_uri"] == broken_version
    assert "Retriever could not load" in version["rollout"]["error"], version
    health = requests.get(f"{app_url}/healthz?deep=true", timeout=30)  # (failed, or loading its next try)
    assert health.status_code == 200 and "Retriever could not load" in health.json()["rollout"]["error"]
    # replicas lost meanwhile are replaced: Serve starts them on the broken version of the config; the
    # Retriever's starts without a version (no Ingress replica runs, so it does not load the served one:
    # see below for one replaced alone) and loads what it is asked for, the Ingress's starts on the
    # version the app was serving (Ray's KV store), tries the broken one again and reports it failed
    victims = {d: replicas(ray_session, d) for d in ("Retriever", "Ingress")}
    for name, namespace in [r for rs in victims.values() for r in rs]:
        ray_session.kill(ray_session.get_actor(name, namespace=namespace), no_restart=True)
    deadline = time.monotonic() + 120
    while any(not (now := replicas(ray_session, d)) or set(now) & set(old) for d, old in victims.items()):
        assert time.monotonic() < deadline, {d: replicas(ray_session, d) for d in victims}
        time.sleep(0.5)
    wait_running(dashboard_url)
    version = wait_version(app_url, lambda v: (v["rollout"] or {}).get("state") == "failed")
    assert version["index_uri"] == served_index and version["rollout"]["index_uri"] == broken_version, version
    assert "Retriever could not load" in version["rollout"]["error"], version
    for user in ("user-00000004", "user-00000005"):
        r = requests.post(f"{app_url}/v1/recommend", json={"user_id": user, "k": 5}, timeout=60)
        assert r.status_code == 200 and r.json()["index_version"] == v1.index_version, r.text
    # a stage replica replaced alone (no new Ingress replica waits for it): it loads the version the app
    # serves at its start, before Serve routes to it; it used to load it on the first request naming it,
    # which held every such request for the whole load
    from ray import serve

    [old] = replicas(ray_session, "Retriever")
    ray_session.kill(ray_session.get_actor(old[0], namespace=old[1]), no_restart=True)
    while not (now := replicas(ray_session, "Retriever")) or old in now:
        assert time.monotonic() < deadline + 120, now
        time.sleep(0.5)
    loaded = serve.get_deployment_handle("Retriever", APP).loaded_versions.remote().result(timeout_s=120)
    assert served_index in loaded, loaded  # the handle reaches only a replica whose start has ended
    # rolled back: nothing pending, the same replicas answer
    serve_deploy(deploy_config(served_index, serve_port), dashboard_url, tmp_path)
    wait_running(dashboard_url)
    wait_version(app_url, lambda v: v["index_uri"] == served_index and v["rollout"] is None)
    assert requests.post(f"{app_url}/v1/recommend", json={"user_id": "user-00000004", "k": 5},
                         timeout=30).status_code == 200
    # deployed again, failing; then the shard repaired with nothing deployed (an index still being written
    # when the config named it): the Ingress tries again by itself (rollout_retry_s) and switches
    serve_deploy(deploy_config(broken_version, serve_port), dashboard_url, tmp_path)
    wait_running(dashboard_url)
    version = wait_version(app_url, lambda v: (v["rollout"] or {}).get("state") == "failed")
    assert version["rollout"]["attempts"] >= 1 and version["rollout"]["retry_at"] > time.time() - 1, version
    storage.write_bytes(join_uri(broken_version, flipped), storage.read_bytes(join_uri(served_index, flipped)))
    version = wait_version(app_url, lambda v: v["index_uri"] == broken_version, timeout_s=180)
    assert version["rollout"] is None, version
    serve_deploy(deploy_config(served_index, serve_port), dashboard_url, tmp_path)
    wait_running(dashboard_url)
    wait_version(app_url, lambda v: v["index_uri"] == served_index and v["rollout"] is None)


@pytest.mark.slow
def test_a_rollout_switches_once_every_replica_of_a_stage_has_the_version(
        app_url, served_index, second_version, dashboard_url, serve_port, tmp_path):
    """Two Retriever replicas: the rollout completes and both replicas hold the new version. (A poll through
    the handle reaches one replica, so the Ingress counts the distinct replicas that said "loaded" against
    the deployment's running replicas; whether the switch waited for the slower one is not observable here
    without a race: this checks the two-replica path end to end.)"""
    from ray import serve

    def config(index_uri):
        c = deploy_config(index_uri, serve_port)
        for d in c["applications"][0]["deployments"]:
            if d["name"] == "Retriever":
                d["autoscaling_config"].update({"min_replicas": 2, "max_replicas": 2})
                d["ray_actor_options"]["num_cpus"] = 0.1
        return c

    retriever = serve.get_deployment_handle("Retriever", APP)
    try:
        serve_deploy(config(served_index), dashboard_url, tmp_path)
        wait_running(dashboard_url)
        seen = {}
        deadline = time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline:  # both replicas up and serving v1
            status = retriever.version_status.remote(served_index).result()
            seen[status["replica"]] = status["loaded"]
        assert len(seen) == 2 and all(seen.values()), seen
        from serve_apps.recommender import _replica_counts

        assert _replica_counts(APP, ["Retriever", "Ranker"]) == {"Retriever": 2, "Ranker": 1}
        serve_deploy(config(second_version), dashboard_url, tmp_path)
        wait_running(dashboard_url)
        wait_version(app_url, lambda v: v["index_uri"] == second_version and v["rollout"] is None)
        after = {}
        while len(after) < 2 and time.monotonic() < deadline + 60:  # at the switch, each replica had it
            status = retriever.version_status.remote(second_version).result()
            after[status["replica"]] = status["loaded"]
        assert set(after) == set(seen) and all(after.values()), after
    finally:
        serve_deploy(deploy_config(served_index, serve_port), dashboard_url, tmp_path)
        wait_running(dashboard_url)
        wait_version(app_url, lambda v: v["index_uri"] == served_index and v["rollout"] is None)


@pytest.mark.slow
def test_a_first_deploy_of_a_version_the_stages_cannot_load_fails_saying_why(
        app_url, served_index, broken_version, dashboard_url, serve_port, tmp_path):
    """A second app deployed beside the session's on the broken version: no stage replica has another
    version to serve, so the Ingress's start fails with the Retriever's error and the deploy fails."""
    import copy

    broken_uri, _ = broken_version
    single = deploy_config(served_index, serve_port)
    broken = copy.deepcopy(deploy_config(broken_uri, serve_port)["applications"][0])
    broken.update(name="broken", route_prefix="/broken")
    for d in broken["deployments"]:
        d["ray_actor_options"]["num_cpus"] = 0.05
    serve_deploy({**single, "applications": [*single["applications"], broken]}, dashboard_url, tmp_path)
    try:
        deadline = time.monotonic() + 240
        status = {}
        while time.monotonic() < deadline:
            status = yaml.safe_load(serve_cli("status", dashboard_url=dashboard_url).stdout or "{}")
            app = status.get("applications", {}).get("broken", {})
            if app.get("status") == "DEPLOY_FAILED":
                break
            assert app.get("status") != "RUNNING", app
            time.sleep(2)
        ingress = status["applications"]["broken"]["deployments"]["Ingress"]
        assert ingress["status"] == "DEPLOY_FAILED", status
        assert "Retriever could not load" in ingress["message"] and "sha256 mismatch" in ingress["message"], ingress
        # the session's app answered all along
        assert requests.post(f"{app_url}/v1/recommend", json={"user_id": "user-00000004", "k": 5},
                             timeout=30).status_code == 200
    finally:
        serve_deploy(single, dashboard_url, tmp_path)  # the broken app is deleted
        wait_running(dashboard_url)


@pytest.mark.slow
def test_a_user_config_with_an_unknown_key_is_reported_and_the_current_version_goes_on(
        app_url, served_index, dashboard_url, serve_port, tmp_path):
    """A typo in user_config (``index_url``) was ignored by every stage; now the Ingress reports it as a
    failed rollout naming the key, and the version being served keeps answering."""
    config = deploy_config(served_index, serve_port)
    for d in config["applications"][0]["deployments"]:
        d["user_config"] = {"index_uri": served_index, "index_url": served_index}
    try:
        serve_deploy(config, dashboard_url, tmp_path)
        wait_running(dashboard_url)
        version = wait_version(app_url, lambda v: (v["rollout"] or {}).get("state") == "failed")
        assert "unknown keys ['index_url']" in version["rollout"]["error"], version
        assert "user_config of Ingress" in version["rollout"]["error"] and version["index_uri"] == served_index
        r = requests.post(f"{app_url}/v1/recommend", json={"user_id": "user-00000004", "k": 5}, timeout=60)
        assert r.status_code == 200, r.text
        # no index_uri at all (a templated config whose variable was unset): its reconfigure used to raise,
        # which Serve counts as a failed replica start: it stopped every Ingress replica, and their
        # replacements failed the same way
        for d in config["applications"][0]["deployments"]:
            d["user_config"] = {"index_uri": ""}
        serve_deploy(config, dashboard_url, tmp_path)
        version = wait_version(app_url, lambda v: "needs index_uri" in ((v["rollout"] or {}).get("error") or ""))
        assert version["rollout"]["state"] == "failed" and version["index_uri"] == served_index, version
        for _ in range(5):
            r = requests.post(f"{app_url}/v1/recommend", json={"user_id": "user-00000004", "k": 5}, timeout=60)
            assert r.status_code == 200, r.text
            time.sleep(1)
        status = yaml.safe_load(serve_cli("status", dashboard_url=dashboard_url).stdout or "{}")
        assert status["applications"][APP]["deployments"]["Ingress"]["status"] == "HEALTHY", status
    finally:
        serve_deploy(deploy_config(served_index, serve_port), dashboard_url, tmp_path)
        wait_running(dashboard_url)
        wait_version(app_url, lambda v: v["index_uri"] == served_index and v["rollout"] is None)
