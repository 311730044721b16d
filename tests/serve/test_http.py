"""Every route of the recommender through real HTTP (Ray Serve proxy -> Ingress -> the three stages)."""

import asyncio
import base64
import json
import time

import pytest
import requests

from tessera.serving import Flow, LocalStages, VersionRef
from tessera.serving.schemas import RecommendRequest

J = {"content-type": "application/json"}


def post(url, path, body, **kw):
    return requests.post(f"{url}{path}", data=json.dumps(body) if not isinstance(body, (bytes, str)) else body,
                         headers=J, timeout=60, **kw)


@pytest.fixture(scope="module")
def version(storage, served_index):
    return VersionRef.resolve(storage, served_index)


@pytest.fixture(scope="module")
def local_flow(storage, served_index, version):
    return Flow(LocalStages(storage), served_index, version.model_version, version.index_version)


@pytest.fixture(scope="module")
def users(local_flow, served_index):
    return local_flow.stages.query.get(served_index).histories.user_ids()


def test_recommend_over_http_matches_the_in_process_pipeline(app_url, users, local_flow, version):
    for user in users[:5]:
        r = post(app_url, "/v1/recommend", {"user_id": user, "k": 7})
        assert r.status_code == 200, r.text
        body = r.json()
        [local] = asyncio.run(local_flow.recommend([RecommendRequest(user_id=user, k=7)]))
        assert [x["item_id"] for x in body["items"]] == [x["item_id"] for x in local["items"]]
        assert body["items"][0]["score"] == pytest.approx(local["items"][0]["score"], rel=1e-4)
        assert body["ranked"] and not body["cold_start"]
        assert (body["model_version"], body["index_version"]) == (version.model_version, version.index_version)
        t = body["timings"]
        assert t["total_ms"] >= t["queue_ms"] + t["encode_ms"] + t["retrieve_ms"] + t["rank_ms"] - 0.01
        assert t["encode_ms"] > 0 and t["queue_ms"] >= 0


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(app_url, users, local_flow):
    from concurrent.futures import ThreadPoolExecutor

    picked = users[:12]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda u: post(app_url, "/v1/recommend", {"user_id": u, "k": 5}), picked))
    assert [a.status_code for a in answers] == [200] * len(picked)
    expected = asyncio.run(local_flow.recommend([RecommendRequest(user_id=u, k=5) for u in picked]))
    for a, e in zip(answers, expected, strict=True):
        assert [x["item_id"] for x in a.json()["items"]] == [x["item_id"] for x in e["items"]]


def test_cold_start_and_recent_items(app_url, local_flow, served_index):
    cold = post(app_url, "/v1/recommend", {"k": 4}).json()
    assert cold["cold_start"] and cold["cold_start_reason"] and len(cold["items"]) == 4
    unknown_user = post(app_url, "/v1/recommend", {"user_id": "nobody-at-all", "k": 4}).json()
    assert unknown_user["cold_start"] and [x["item_id"] for x in unknown_user["items"]] == \
        [x["item_id"] for x in cold["items"]]
    items = local_flow.stages.query.get(served_index).items
    recent = [str(i) for i in items.ids[items.indexed][:2]]
    warm = post(app_url, "/v1/recommend", {"user_id": "nobody-at-all", "recent_item_ids": recent, "k": 4}).json()
    assert not warm["cold_start"] and not set(recent) & {x["item_id"] for x in warm["items"]}


def test_a_hanging_media_query_does_not_hold_text_searches_or_users(app_url, shared_data, dashboard_url):
    """The decoding child stopped (SIGSTOP: a decode that hangs) holds its image query until the decode
    timeout; text searches and recommendations sent meanwhile are answered first. Texts and media shared one
    batch queue, so a text query waited for the hanging decode."""
    import signal
    import threading

    import psutil
    from ray.util.state import list_actors

    jpeg = next((shared_data / "grocery").rglob("*.jpg")).read_bytes()
    image = {"image": base64.b64encode(jpeg).decode(), "k": 3, "index": "image"}
    assert post(app_url, "/v1/search", image).status_code == 200  # a decoding child exists
    alive = list_actors(address=dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000)
    replicas = [psutil.Process(a.pid) for a in alive if "QueryEncoder" in a.class_name]
    children = [c for r in replicas for c in r.children() if "tessera.encoders.isolated" in " ".join(c.cmdline())]
    assert children
    done: list[tuple[str, int]] = []

    def send(name, path, body):
        done.append((name, post(app_url, path, body).status_code))

    for child in children:
        child.send_signal(signal.SIGSTOP)
    try:
        stuck = threading.Thread(target=send, args=("image", "/v1/search", image))
        stuck.start()
        time.sleep(0.5)
        send("text", "/v1/search", {"text": "tomato", "k": 3})
        send("user", "/v1/recommend", {"user_id": "user-00000004", "k": 3})
        assert stuck.is_alive(), done  # the image query still waits on its decoder
    finally:
        for child in children:
            try:
                child.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:  # killed by the decode timeout meanwhile
                pass
    stuck.join(timeout=120)
    assert done[:2] == [("text", 200), ("user", 200)] and done[2][0] == "image", done
    assert post(app_url, "/v1/search", image).status_code == 200  # and media queries go on


@pytest.mark.parametrize("body, status, words", [
    ({"recent_item_ids": ["no-such-item-1", "no-such-item-2"]}, 422, ["no-such-item-1", "no-such-item-2"]),
    ({"k": 51}, 422, ["max_k=50"]),
    ({"k": 0}, 422, ["greater than or equal to 1"]),
    ({"k": 5000}, 422, ["less than or equal"]),
    ({"user": "typo"}, 422, ["Extra inputs", "user"]),
    ({"k": "ten"}, 422, ["valid integer"]),
    ({"k": True}, 422, ["valid integer"]),
    ({"k": "5"}, 422, ["valid integer"]),
    ({"exclude_seen": "yes"}, 422, ["valid boolean"]),
    ("{not json", 422, ["JSON decode error"]),
])
def test_bad_recommend_requests_get_a_4xx_saying_what_is_wrong(app_url, body, status, words):
    r = post(app_url, "/v1/recommend", body)
    assert r.status_code == status, r.text
    for w in words:
        assert w in r.text


def test_search_by_text_image_and_audio(app_url, shared_data):
    text = post(app_url, "/v1/search", {"text": "fresh green vegetables", "k": 5})
    assert text.status_code == 200, text.text
    assert len(text.json()["items"]) == 5 and text.json()["modality"] == "text"
    jpeg = next((shared_data / "grocery").rglob("*.jpg")).read_bytes()
    image = post(app_url, "/v1/search", {"image": base64.b64encode(jpeg).decode(), "k": 3, "index": "image"})
    assert image.status_code == 200, image.text
    assert image.json()["index"] == "image" and len(image.json()["items"]) == 3
    wav = next((shared_data / "fsdd").rglob("*.wav")).read_bytes()
    audio = post(app_url, "/v1/search", {"audio": base64.b64encode(wav).decode(), "k": 3})
    assert audio.status_code == 200 and audio.json()["modality"] == "audio"


def test_media_queries_are_decoded_in_a_child_of_the_query_encoder_which_outlives_it(app_url, shared_data,
                                                                                     dashboard_url):
    """Image and audio bytes are decoded in a child process of the QueryEncoder replica, so a decoder crash
    kills the child, not the replica: killed here (SIGKILL, as a segfault ends it), the next image search
    is answered by a new child of the same replica."""
    import psutil
    from ray.util.state import list_actors

    jpeg = next((shared_data / "grocery").rglob("*.jpg")).read_bytes()
    body = {"image": base64.b64encode(jpeg).decode(), "k": 3, "index": "image"}
    first = post(app_url, "/v1/search", body)
    assert first.status_code == 200, first.text
    alive = list_actors(address=dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000)
    replicas = [psutil.Process(a.pid) for a in alive if "QueryEncoder" in a.class_name]

    def decoding_children():
        return [c for r in replicas for c in r.children() if "tessera.encoders.isolated" in " ".join(c.cmdline())]

    children = decoding_children()
    assert children, "no decoding child process under a QueryEncoder replica"
    for child in children:
        child.kill()
    psutil.wait_procs(children, timeout=10)
    again = post(app_url, "/v1/search", body)
    assert again.status_code == 200, again.text
    assert [x["item_id"] for x in again.json()["items"]] == [x["item_id"] for x in first.json()["items"]]
    assert all(r.is_running() for r in replicas)  # the replicas lived on
    fresh = decoding_children()  # the new children are the same replicas' own
    assert fresh and not {c.pid for c in fresh} & {c.pid for c in children}


@pytest.mark.parametrize("body, status, words", [
    ({"image": "%%% not base64 %%%"}, 422, ["image is not valid base64"]),
    ({"image": base64.b64encode(b"\xff\xd8\xff\xe0 this is no jpeg").decode()}, 422, ["image query rejected"]),
    ({"audio": base64.b64encode(b"RIFF\x10\x00\x00\x00WAVEfmt ").decode()}, 422, ["audio query rejected"]),
    ({"text": "a", "image": "AAAA"}, 422, ["exactly one of text, image, audio"]),
    ({}, 422, ["exactly one"]),
    ({"text": "tomato", "index": "smell"}, 422, ["index"]),
])
def test_bad_search_requests_get_a_4xx(app_url, body, status, words):
    r = post(app_url, "/v1/search", body)
    assert r.status_code == status, r.text
    for w in words:
        assert w in r.text


def test_payload_over_the_limit_is_413(app_url):
    big = base64.b64encode(b"\x00" * 900_000).decode()  # 1.2 MB of base64 > max_body_bytes=1_000_000
    r = post(app_url, "/v1/search", {"image": big})
    assert r.status_code == 413 and "over the limit" in r.text and r.json()["kind"] == "too_large"
    # sent chunked (no Content-Length to check up front): refused while it is read, not processed
    body = json.dumps({"image": big}).encode()
    chunked = requests.post(f"{app_url}/v1/search", data=(body[i:i + 65536] for i in range(0, len(body), 65536)),
                            headers=J, timeout=60)
    assert chunked.status_code == 413 and chunked.json()["kind"] == "too_large", chunked.text
    small = json.dumps({"text": "tomato", "k": 2}).encode()
    ok = requests.post(f"{app_url}/v1/search", data=iter([small[:5], small[5:]]), headers=J, timeout=60)
    assert ok.status_code == 200, ok.text


def test_422s_say_what_is_wrong_without_echoing_the_input(app_url):
    many = [f"no-such-item-{i}" for i in range(3000)]
    r = post(app_url, "/v1/recommend", {"recent_item_ids": many, "k": "ten"})
    assert r.status_code == 422 and "valid integer" in r.text
    assert len(r.content) < 2000 and "no-such-item-1" not in r.text
    # a lone surrogate is valid JSON but not UTF-8: was a bare 500 while the error echoed it back
    for path, raw in [("/v1/search", '{"text": "\\ud800", "k": 3}'), ("/v1/recommend", '{"\\ud800": 1}'),
                      ("/v1/recommend", '{"user_id": "a\\udc80b"}')]:
        bad = requests.post(f"{app_url}{path}", data=raw, headers=J, timeout=60)
        assert bad.status_code == 422 and bad.json()["kind"] == "bad_request", (raw, bad.status_code, bad.text)


def test_base64_as_common_tools_write_it_is_accepted(app_url, shared_data):
    jpeg = next((shared_data / "grocery").rglob("*.jpg")).read_bytes()
    plain = post(app_url, "/v1/search", {"image": base64.b64encode(jpeg).decode(), "k": 3, "index": "image"}).json()
    wrapped = base64.encodebytes(jpeg).decode()  # 76-column lines, as the base64 tool writes
    # the last: whitespace taking it past 256k characters, so it is decoded on a thread, off the event loop
    for variant in (wrapped, "data:image/jpeg;base64," + base64.b64encode(jpeg).decode(),
                    base64.urlsafe_b64encode(jpeg).decode().rstrip("="), wrapped + "\n" * 300_000):
        r = post(app_url, "/v1/search", {"image": variant, "k": 3, "index": "image"})
        assert r.status_code == 200, r.text
        assert [x["item_id"] for x in r.json()["items"]] == [x["item_id"] for x in plain["items"]]
    bad = post(app_url, "/v1/search", {"image": "data:image/jpeg,AAAA", "k": 3})
    assert bad.status_code == 422 and "data:<type>;base64" in bad.text


def test_a_png_that_crashed_the_decoder_is_a_422_and_the_encoder_lives_on(app_url):
    """A 67-byte PNG with an empty IDAT stream segfaulted torchvision's decoder: the QueryEncoder
    replica died, and each retry killed the next one. Now a 422, and the same replica keeps answering."""
    from tests.encoders.conftest import raw_png

    png = raw_png(1, 1, b"")
    before = post(app_url, "/v1/search", {"text": "tomato", "k": 2})
    r = post(app_url, "/v1/search", {"image": base64.b64encode(png).decode(), "k": 3})
    assert r.status_code == 422 and "image query rejected" in r.text and "png" in r.text, r.text
    after = post(app_url, "/v1/search", {"text": "tomato", "k": 2})
    assert before.status_code == after.status_code == 200 and after.json()["items"] == before.json()["items"]


def test_similar_items(app_url, local_flow, served_index):
    items = local_flow.stages.query.get(served_index).items
    item = str(items.ids[items.indexed][3])
    r = requests.get(f"{app_url}/v1/items/{item}/similar", params={"k": 6}, timeout=30)
    assert r.status_code == 200, r.text
    got = [x["item_id"] for x in r.json()["items"]]
    assert len(got) == 6 and item not in got
    assert requests.get(f"{app_url}/v1/items/not-an-item/similar", timeout=30).status_code == 404
    # an id holding "/" (decoded from %2F before routing) reaches the route: our 404, naming it
    r = requests.get(f"{app_url}/v1/items/sku%2F12/34/similar", timeout=30)
    assert r.status_code == 404 and r.json()["kind"] == "not_found" and "sku/12/34" in r.json()["detail"], r.text
    assert requests.get(f"{app_url}/v1/items/{item}/similar", params={"k": 0}, timeout=30).status_code == 422
    assert requests.get(f"{app_url}/v1/items/{item}/similar", params={"k": 99}, timeout=30).status_code == 422


def test_health_version_and_openapi(app_url, version):
    assert requests.get(f"{app_url}/healthz", timeout=10).json()["status"] == "ok"
    v = requests.get(f"{app_url}/v1/version", timeout=10).json()
    assert v["index_version"] == version.index_version and v["model_uri"] == version.model_uri
    assert v["num_items"] == version.manifest.num_items and v["recall_check"]["recall"] >= 0.95
    spec = requests.get(f"{app_url}/openapi.json", timeout=10).json()
    assert {"/v1/recommend", "/v1/search", "/v1/items/{item_id}/similar", "/healthz", "/v1/version"} <= set(
        spec["paths"])
    # the schema states the deployment's max_k (50 here), not the models' ceiling (1000)
    models = spec["components"]["schemas"]
    assert models["RecommendRequest"]["properties"]["k"]["maximum"] == 50
    assert models["SearchRequest"]["properties"]["k"]["maximum"] == 50
    [k] = [p for p in spec["paths"]["/v1/items/{item_id}/similar"]["get"]["parameters"] if p["name"] == "k"]
    assert k["schema"]["minimum"] == 1 and k["schema"]["maximum"] == 50
    assert requests.get(f"{app_url}/docs", timeout=10).status_code == 200


def test_deep_health_asks_every_stage(app_url, served_index):
    r = requests.get(f"{app_url}/healthz", params={"deep": "true"}, timeout=30)
    assert r.status_code == 200, r.text
    stages = r.json()["stages"]
    assert set(stages) == {"QueryEncoder", "Retriever", "Ranker"}
    for name, stage in stages.items():
        assert stage["ok"] and stage["has_current"], (name, stage)
        assert served_index.rstrip("/") in stage["versions"]
    assert "stages" not in requests.get(f"{app_url}/healthz", timeout=10).json()  # the plain check calls no stage
    assert requests.get(f"{app_url}/healthz", params={"deep": "maybe"}, timeout=10).status_code == 422


def _handle(name: str):
    from ray.serve.handle import DeploymentHandle

    return DeploymentHandle(name, "recommender")


def _live_handle(name: str):
    """A handle to a live stage that has answered once: a new handle's first call also waits for its set-up,
    which is made here, not inside the few seconds a test then measures."""
    handle = _handle(name)
    handle.loaded_versions.remote().result(timeout_s=60)
    return handle


def test_deep_health_names_a_stage_that_does_not_answer(app_url, served_index):
    """HandleStages.probe (what ``deep=true`` runs) against the live stages plus a handle to a deployment
    with no replica (a call to it waits for one): that one is reported as not answering, the live ones ok."""
    from serve_apps.recommender import HandleStages

    stages = HandleStages(_live_handle("QueryEncoder"), [_live_handle("Retriever"), _handle("NoSuchStage")],
                          _live_handle("Ranker"))
    report = asyncio.run(stages.probe(served_index, timeout_s=3.0))
    assert report["NoSuchStage"] == {"ok": False, "error": "no answer within 3 s"}
    assert all(report[n]["ok"] and report[n]["has_current"] for n in ("QueryEncoder", "Retriever", "Ranker"))


def test_a_stage_call_past_the_stage_timeout_is_dropped_naming_the_stage(app_url, served_index, local_flow):
    """HandleStages with ``stage_timeout_s`` against the live stages plus a deployment with no replica (a call to
    it waits for one, as it would for a hung or saturated stage): that call ends in StageTimeoutError naming it
    after the timeout, where the request waited with no bound; the live stage answers within it."""
    import numpy as np

    from serve_apps.recommender import HandleStages, StageTimeoutError

    item = local_flow.stages.query.get(served_index).items.ids[0]
    stages = HandleStages(_live_handle("QueryEncoder"), [_handle("NoSuchStage")], _handle("Ranker"), timeout_s=2.0)

    async def go():
        [vector] = await stages.item_vectors(served_index, [item])  # the live stage answers within the 2 s
        start = time.monotonic()
        with pytest.raises(StageTimeoutError, match="NoSuchStage did not answer within 2 s"):
            await stages.search(served_index, "fused", np.asarray([vector]), 5, None)
        return time.monotonic() - start

    assert 1.9 < asyncio.run(go()) < 10


@pytest.mark.slow
def test_a_query_encoder_past_the_stage_timeout_is_a_504_and_others_go_on(app_url, served_index, shared_data,
                                                                          dashboard_url, serve_port, tmp_path):
    """A second app with ``stage_timeout_s: 2``, its QueryEncoder's decoding child stopped (an image query then
    waits on it for ``decode_timeout_s``, 30 s): the image search is a 504 naming the stage within seconds, text
    searches of the same app are answered meanwhile, and once the child goes on, image searches do too."""
    import copy
    import signal

    import psutil
    from ray.util.state import list_actors

    from tests.serve.conftest import deploy_config, serve_deploy

    single = deploy_config(served_index, serve_port)
    bounded = copy.deepcopy(single["applications"][0])
    bounded.update(name="bounded", route_prefix="/bounded")
    bounded["args"].update(stage_timeout_s=2.0, decode_timeout_s=30.0)
    for d in bounded["deployments"]:
        d["ray_actor_options"]["num_cpus"] = 0.05
    serve_deploy({**single, "applications": [*single["applications"], bounded]}, dashboard_url, tmp_path)
    jpeg = next((shared_data / "grocery").rglob("*.jpg")).read_bytes()
    image = {"image": base64.b64encode(jpeg).decode(), "k": 3, "index": "image"}
    children = []
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if post(app_url, "/bounded/v1/search", image).status_code == 200:  # its decoding child exists
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the bounded app did not come up"
            time.sleep(1)
        alive = list_actors(address=dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000, detail=True)
        [replica] = [psutil.Process(a.pid) for a in alive if (a.name or "").startswith("SERVE_REPLICA::bounded#Query")]
        children = [c for c in replica.children() if "tessera.encoders.isolated" in " ".join(c.cmdline())]
        assert children
        for child in children:
            child.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        answer = post(app_url, "/bounded/v1/search", image)
        waited = time.monotonic() - start
        assert answer.status_code == 504 and answer.json()["kind"] == "timeout", answer.text
        assert "QueryEncoder did not answer within 2 s" in answer.json()["detail"]
        assert waited < 15, waited  # not the decoder's 30 s
        assert post(app_url, "/bounded/v1/search", {"text": "tomato", "k": 3}).status_code == 200
    finally:
        for child in children:
            try:
                child.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
    try:
        assert post(app_url, "/bounded/v1/search", image).status_code == 200
    finally:
        serve_deploy(single, dashboard_url, tmp_path)  # the bounded app is deleted


@pytest.mark.slow
def test_retriever_groups_answer_like_one_retriever(app_url, users, served_index, dashboard_url, serve_port, tmp_path):
    """``args.retriever_groups: 3`` deployed beside the session's app with the real CLI (Retriever_0..2, each
    holding the shards whose id is its number modulo 3, the fused index scattered over them and merged, the
    modality indexes in group 0): the same answers as the one-Retriever app."""
    import copy

    from tests.serve.conftest import deploy_config, serve_deploy

    single = deploy_config(served_index, serve_port)
    grouped = copy.deepcopy(single["applications"][0])
    grouped.update(name="groups", route_prefix="/groups")
    grouped["args"]["retriever_groups"] = 3
    retriever = next(d for d in grouped["deployments"] if d["name"] == "Retriever")
    grouped["deployments"] = [d for d in grouped["deployments"] if d is not retriever] + [
        {**copy.deepcopy(retriever), "name": f"Retriever_{i}"} for i in range(3)]
    for d in grouped["deployments"]:
        d["ray_actor_options"]["num_cpus"] = 0.05
    both = {**single, "applications": [*single["applications"], grouped]}
    serve_deploy(both, dashboard_url, tmp_path)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{app_url}/groups/healthz?deep=true", timeout=10).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the grouped app did not come up"
            time.sleep(1)
        stages = requests.get(f"{app_url}/groups/healthz?deep=true", timeout=30).json()["stages"]
        assert {"Retriever_0", "Retriever_1", "Retriever_2"} <= set(stages)
        for user in users[:4]:
            one = post(app_url, "/v1/recommend", {"user_id": user, "k": 7}).json()
            three = post(app_url, "/groups/v1/recommend", {"user_id": user, "k": 7}).json()
            assert [x["item_id"] for x in three["items"]] == [x["item_id"] for x in one["items"]], user
        one = post(app_url, "/v1/search", {"text": "ceramic mug", "k": 5, "index": "text"}).json()
        three = post(app_url, "/groups/v1/search", {"text": "ceramic mug", "k": 5, "index": "text"}).json()
        assert [x["item_id"] for x in three["items"]] == [x["item_id"] for x in one["items"]]
    finally:
        serve_deploy(single, dashboard_url, tmp_path)  # the grouped app is deleted
