"""The serving pipeline in one process (no Serve): trained bundle + index from the session's real jobs."""

import asyncio
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from tessera.index import read_index_manifest
from tessera.serving import Flow, LocalStages, RequestError, VersionCache, VersionError, VersionRef
from tessera.serving.query import UserQuery
from tessera.serving.rank import RankInput
from tessera.serving.schemas import RecommendRequest, SearchRequest
from tessera.storage import join_uri


@pytest.fixture(scope="module")
def local(served_index, storage):
    stages = LocalStages(storage)
    ref = VersionRef.resolve(storage, served_index)
    return stages, Flow(stages, served_index, ref.model_version, ref.index_version), ref


def run(coro):
    return asyncio.run(coro)


def test_version_pairs_the_index_with_the_bundle_it_names(local, trained_bundle):
    _, _, ref = local
    cfg, manifest = trained_bundle
    assert ref.model_uri == cfg.bundle_uri and ref.model_version == manifest["version"]
    assert ref.embedding_run == manifest["embedding_run"] and ref.interactions_uri


def test_recommend_is_the_exact_top_k_of_user_tower_over_item_vectors_then_ranked(local, served_index):
    stages, flow, ref = local
    query = stages.query.get(served_index)
    user = query.histories.user_ids()[0]
    [enc] = query.encode_users([UserQuery(user)])
    items = query.items
    # brute force over every indexed item, seen ones removed
    scores = items.fused @ enc.vector
    scores[~items.indexed] = -np.inf
    scores[enc.exclude_rows] = -np.inf
    exact = set(items.ids[np.argsort(-scores)[:flow.candidates]])
    [answer] = run(flow.recommend([RecommendRequest(user_id=user, k=10)]))
    got = [x["item_id"] for x in answer["items"]]
    assert len(got) == 10 and not answer["cold_start"] and answer["ranked"]
    assert set(got) <= exact  # ranked from the retrieval candidates (index recall is 1.0 at this size)
    assert not set(got) & set(enc.exclude_ids)  # nothing the user has seen
    finals = [x["score"] for x in answer["items"]]
    assert finals == sorted(finals, reverse=True)
    assert answer["model_version"] == ref.model_version and answer["timings"]["total_ms"] > 0


def test_a_served_user_vector_is_the_one_training_computes_from_the_same_events(local, served_index, storage):
    """Serving assembles a user's history from the log snapshot; training from its own user records
    (:func:`tessera.train.examples.user_records`, the evaluation's padding). The same events must give
    the same vector: same order, times, weights and cut. (That no side can place the request at another
    time, as training once did, is the tower's signature: ``test_the_tower_takes_no_request_time``.)"""
    import torch

    from tessera.interactions import read_interactions
    from tessera.models import pad_histories
    from tessera.train.examples import user_records

    stages, _, ref = local
    query = stages.query.get(served_index)
    log = read_interactions(storage, ref.interactions_uri).to_pandas()
    tower = query.user_tower
    n = tower.config.max_history
    users = [u for u in query.histories.user_ids()[:40] if (log.user_id == u).sum() > 3][:8]
    assert users
    served = query.encode_users([UserQuery(u) for u in users])
    for user, enc in zip(users, served, strict=True):
        events = log[(log.user_id == user) & log.item_id.notna() & log.ts.notna()]
        rows = query.items.rows(events.item_id.tolist())
        events, rows = events[rows >= 0], rows[rows >= 0]
        rec = user_records({"user_id": events.user_id.to_numpy(), "item_row": rows, "ts": events.ts.to_numpy(),
                            "weight": events.weight.to_numpy()}, holdout=0)
        items, ts, w = rec["train_items"][0], rec["train_ts"][0], rec["train_w"][0]
        usable = query.items.has_vector[items]  # every item: training reads one out of the index too
        assert usable.all()
        batch = pad_histories([items[usable][-n:]], n, timestamps=[ts[usable][-n:]], weights=[w[usable][-n:]])
        with torch.no_grad():
            trained = tower(torch.from_numpy(query.items.fused)[batch.item_idx], batch.mask, batch.timestamps_ms,
                            batch.weights)[0].numpy()
        np.testing.assert_allclose(enc.vector, trained, rtol=1e-5, atol=1e-6)


def test_an_answer_does_not_depend_on_the_k_of_its_batch_mates(local, served_index):
    """One search serves the batch at its largest k; each request must still rank only its own
    max(k, candidates) candidates (with a k=100 batch mate, k=10 answers used to change)."""
    stages, flow, ref = local
    users = stages.query.get(served_index).histories.user_ids()[:12]

    class Recording(LocalStages):  # the real stages, keeping what the ranker is handed
        async def rank(self, index_uri, inputs):
            handed.append([len(x.candidate_ids) for x in inputs])
            return await super().rank(index_uri, inputs)

    handed: list[list[int]] = []
    recording = Flow(Recording(stages.storage), served_index, ref.model_version, ref.index_version)
    alone = [run(recording.recommend([RecommendRequest(user_id=u, k=10)]))[0] for u in users[:6]]
    mixed = run(recording.recommend([RecommendRequest(user_id=u, k=10) for u in users[:6]]
                                    + [RecommendRequest(user_id=u, k=100) for u in users[6:]]))
    assert handed[-1] == [flow.candidates] * 6 + [100] * 6
    for a, b in zip(alone, mixed[:6], strict=True):
        assert [x["item_id"] for x in a["items"]] == [x["item_id"] for x in b["items"]]
        assert np.allclose([x["score"] for x in a["items"]], [x["score"] for x in b["items"]], atol=1e-4)
    assert all(len(m["items"]) == 100 for m in mixed[6:])


def test_exclude_seen_false_may_return_seen_items_and_true_never_does(local, served_index):
    stages, flow, _ = local
    query = stages.query.get(served_index)
    users = query.histories.user_ids()[:10]
    seen_any = False
    answers = run(flow.recommend([RecommendRequest(user_id=u, k=20, exclude_seen=False) for u in users]))
    for u, a in zip(users, answers, strict=True):
        seen = set(query.items.ids[query.histories.of(u).seen])
        seen_any |= bool(seen & {x["item_id"] for x in a["items"]})
    assert seen_any  # the tower puts a user's own items near them
    for u, a in zip(users, run(flow.recommend([RecommendRequest(user_id=u, k=20) for u in users])), strict=True):
        assert not set(query.items.ids[query.histories.of(u).seen]) & {x["item_id"] for x in a["items"]}


def test_cold_start_is_the_popular_items_from_the_bundle_and_flagged(local, storage, served_index):
    stages, flow, ref = local
    table = pq.read_table(storage.filesystem(join_uri(ref.model_uri, "item_popularity.parquet"))[1],
                          filesystem=storage.filesystem(ref.model_uri)[0])
    counts = dict(zip(table.column("item_id").to_pylist(), table.column("train_interactions").to_pylist(), strict=True))
    indexed = set(stages.query.get(served_index).items.ids[stages.query.get(served_index).items.indexed])
    for req in (RecommendRequest(k=5), RecommendRequest(user_id="no-such-user", k=5)):
        [a] = run(flow.recommend([req]))
        assert a["cold_start"] and a["cold_start_reason"] and not a["ranked"]
        got = [x["item_id"] for x in a["items"]]
        best = sorted((i for i in counts if i in indexed), key=lambda i: (-counts[i], i))[:5]
        assert got == best


def test_recent_items_make_a_new_user_warm_and_unknown_ones_are_listed(local, served_index):
    stages, flow, _ = local
    items = stages.query.get(served_index).items
    recent = list(items.ids[items.indexed][:3])
    a, b = run(flow.recommend([RecommendRequest(recent_item_ids=recent, k=5),
                               RecommendRequest(recent_item_ids=[recent[0], "nope-1", "nope-2"], k=5)]))
    assert not a["cold_start"] and not set(recent) & {x["item_id"] for x in a["items"]}
    assert isinstance(b, RequestError) and b.status == 422 and "nope-1" in b.detail and "nope-2" in b.detail


def test_text_search_finds_the_item_whose_text_it_is(local, served_index, storage, sample_corpus):
    """Cross-modal sanity: an item's own description, encoded as a query, ranks that item near the top."""
    _, flow, _ = local
    items_uri = join_uri(sample_corpus["config"].root, "corpus", "items")
    part = storage.list_files(items_uri, ".parquet")[0]
    table = pq.read_table(storage.filesystem(part)[1], filesystem=storage.filesystem(part)[0],
                          columns=["item_id", "text"])
    rows = []
    for item, raw in zip(table.column("item_id").to_pylist(), table.column("text").cast("binary").to_pylist(),
                         strict=True):
        try:
            text = (raw or b"").decode("utf-8")
        except UnicodeDecodeError:  # the corpus's deliberately bad texts
            continue
        if len(text.strip()) > 40:
            rows.append((item, text))
    rows = rows[:8]
    answers = run(flow.search([SearchRequest(text=t, k=10, index="text") for _, t in rows], [t for _, t in rows]))
    hits = sum(item in [x["item_id"] for x in a["items"]] for (item, _), a in zip(rows, answers, strict=True))
    assert hits >= len(rows) - 1, answers


def test_bad_media_queries_fail_their_request_only(local, shared_data):
    _, flow, _ = local
    jpeg = next((shared_data / "grocery").rglob("*.jpg")).read_bytes()
    wav = next((shared_data / "fsdd").rglob("*.wav")).read_bytes()
    reqs = [SearchRequest(image="x", k=3), SearchRequest(image="x", k=3), SearchRequest(audio="x", k=3),
            SearchRequest(audio="x", k=3)]
    answers = run(flow.search(reqs, [jpeg, b"\xff\xd8\xff\xe0garbage", wav, wav[:60]]))
    assert [x["item_id"] for x in answers[0]["items"]] and answers[2]["items"]
    assert isinstance(answers[1], RequestError) and answers[1].status == 422 and "image" in answers[1].detail
    assert isinstance(answers[3], RequestError) and answers[3].status == 422 and "audio" in answers[3].detail


def test_a_query_with_a_non_finite_embedding_fails_alone(local, shared_data):
    """A float WAV of samples near float32's maximum passes the decoder's finiteness check, but its
    normalisation overflows: its embedding is NaN. That query gets a 422; the good one sharing its
    encode batch is answered (projecting the batch refused it whole, a 503 for every query in it)."""
    import io

    import soundfile

    _, flow, _ = local
    wav = next((shared_data / "fsdd").rglob("*.wav")).read_bytes()
    out = io.BytesIO()
    soundfile.write(out, np.full(8000, 3e38, np.float32), 8000, subtype="FLOAT", format="WAV")
    answers = run(flow.search([SearchRequest(audio="x", k=3), SearchRequest(audio="x", k=3)], [out.getvalue(), wav]))
    assert isinstance(answers[0], RequestError) and answers[0].status == 422, answers[0]
    assert "not finite" in answers[0].detail
    assert not isinstance(answers[1], RequestError) and answers[1]["items"], answers[1]


def test_similar_leaves_the_item_out_and_unknown_is_404(local, served_index):
    stages, flow, _ = local
    items = stages.query.get(served_index).items
    item = str(items.ids[items.indexed][0])
    a, b = run(flow.similar([item, "nope"], [5, 5]))
    assert len(a["items"]) == 5 and item not in {x["item_id"] for x in a["items"]}
    assert isinstance(b, RequestError) and b.status == 404


def test_untrained_ranker_keeps_retrieval_order(local, served_index):
    stages, _, _ = local
    core = stages.ranker.get(served_index)
    cands = [str(i) for i in core.items.ids[core.items.indexed][:6]]
    scores = np.linspace(0.9, 0.4, 6).astype(np.float32)
    trained = core.trained
    try:
        core.trained = False
        [out] = core.rank([RankInput(np.array([0]), cands, scores, 4, np.empty(0, np.int64))])
    finally:
        core.trained = trained
    assert out.ids == cands[:4] and not out.ranked
    [out] = core.rank([RankInput(np.array([0, 1]), cands, scores, 4, np.empty(0, np.int64))])
    assert out.ranked and set(out.ids) <= set(cands)


def test_version_errors_name_what_is_missing(storage, served_index, bucket_uri):
    with pytest.raises(VersionError, match="no index at"):
        VersionRef.resolve(storage, f"{bucket_uri}/index/none")
    # an index whose manifest names another model version than the bundle now holds
    manifest = read_index_manifest(storage, served_index)
    bad = manifest.model_copy(update={"model_version": "other"})
    from tessera.index import write_index_manifest

    uri = f"{bucket_uri}/index/mismatch"
    write_index_manifest(storage, uri, bad)
    with pytest.raises(VersionError, match="model version 'other'"):
        VersionRef.resolve(storage, uri)
    # the same version, retrained in place since (jobs.train --overwrite): its files differ from the ones the
    # index was built from, which the version alone did not tell
    assert manifest.source["model_fingerprint"].startswith("sha256:")  # recorded by the index job
    VersionRef.resolve(storage, served_index)
    retrained = manifest.model_copy(update={"source": {**manifest.source, "model_fingerprint": "sha256:" + "0" * 64}})
    uri = f"{bucket_uri}/index/retrained"
    write_index_manifest(storage, uri, retrained)
    with pytest.raises(VersionError, match="another training of model version"):
        VersionRef.resolve(storage, uri)


def test_item_vectors_changed_since_the_build_are_refused(storage, served_index, bucket_uri):
    """The index job records each vectors part's digest of what serving reads (item ids and fused vectors);
    a part replaced since (still valid Parquet with the same ids, two items' vectors swapped) is refused,
    where it loaded and paired wrong item vectors with the user tower. A faithful copy loads."""
    import pyarrow as pa

    from tessera.index import write_index_manifest
    from tessera.serving.version import ItemVectors

    manifest = read_index_manifest(storage, served_index)
    assert manifest.item_vectors and set(manifest.item_vectors_sha256) == set(manifest.item_vectors)
    for name, tamper in (("faithful", False), ("tampered", True)):
        uri = f"{bucket_uri}/index/{name}"
        write_index_manifest(storage, uri, manifest)
        for n, rel in enumerate(manifest.item_vectors):
            data = storage.read_bytes(join_uri(served_index, rel))
            if tamper and n == 0:
                table = pq.read_table(pa.BufferReader(data))
                fused = table.column("fused").to_pylist()
                fused[0], fused[1] = fused[1], fused[0]
                table = table.set_column(table.schema.get_field_index("fused"), table.schema.field("fused"),
                                         pa.array(fused, table.schema.field("fused").type))
                storage.write_parquet(join_uri(uri, rel), table)
            else:
                storage.write_bytes(join_uri(uri, rel), data)
        ref = VersionRef.resolve(storage, uri)
        if tamper:
            with pytest.raises(VersionError, match="does not match the checksum in the index manifest"):
                ItemVectors.load(storage, ref)
        else:
            assert ItemVectors.load(storage, ref).num_items == manifest.counts["input_items"]
    # an index built before digests were recorded still loads (nothing to check it against)
    write_index_manifest(storage, uri, manifest.model_copy(update={"item_vectors_sha256": {}}))
    assert ItemVectors.load(storage, VersionRef.resolve(storage, uri)).num_items == manifest.counts["input_items"]


def test_an_item_out_of_the_index_still_feeds_a_history(storage, served_index, bucket_uri):
    """An item without a usable modality is left out of the fused index (``no_modality: exclude``) but keeps the
    fused vector training fed the user tower for it: serving reads it in a history, never recommends it and
    answers 404 for its vector. Made here by marking two items of the served vectors ``no_modality`` (the vectors
    untouched, so their digests hold; the manifest's count of indexed items follows, and a status changed
    without it is refused). An index built before every item had a vector (those two nulled) still loads, the
    two left out of histories as that build's self-check left them."""
    import pyarrow as pa

    from tessera.index import write_index_manifest
    from tessera.index_job.vectors import STATUS_NO_MODALITY
    from tessera.serving.version import ItemVectors

    manifest = read_index_manifest(storage, served_index)
    served = ItemVectors.load(storage, VersionRef.resolve(storage, served_index))
    assert served.has_vector.all() and served.indexed.sum() == manifest.counts["indexed"]
    for name, old in (("excluded", False), ("excluded-old", True)):
        uri = f"{bucket_uri}/index/{name}"
        marked = []
        for n, rel in enumerate(manifest.item_vectors):
            table = pq.read_table(pa.BufferReader(storage.read_bytes(join_uri(served_index, rel))))
            if n == 0:
                status = table.column("status").to_pylist()
                rows = [r for r, st in enumerate(status) if st == "ok"][:2]
                marked = [table.column("item_id")[r].as_py() for r in rows]
                for r in rows:
                    status[r] = STATUS_NO_MODALITY
                table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status))
                if old:
                    fused = table.column("fused").to_pylist()
                    for r in rows:
                        fused[r] = None
                    table = table.set_column(table.schema.get_field_index("fused"), table.schema.field("fused"),
                                             pa.array(fused, table.schema.field("fused").type))
            storage.write_parquet(join_uri(uri, rel), table)
        digests = {"item_vectors_sha256": {}} if old else {}  # an old index: recorded none (its nulls differ)
        write_index_manifest(storage, uri, manifest.model_copy(update=digests))  # indexed items: 2 too many
        with pytest.raises(VersionError, match="mark .* items as in the fused index, its manifest counts"):
            ItemVectors.load(storage, VersionRef.resolve(storage, uri))
        counts = {**manifest.counts, "indexed": manifest.counts["indexed"] - 2}
        write_index_manifest(storage, uri, manifest.model_copy(update={"counts": counts, **digests}))
        items = ItemVectors.load(storage, VersionRef.resolve(storage, uri))
        rows = items.rows(marked)
        assert len(marked) == 2 and not items.indexed[rows].any()
        assert items.indexed.sum() == served.indexed.sum() - 2
        np.testing.assert_array_equal(items.has_vector[rows], [not old] * 2)
        query = LocalStages(storage, preload_modalities=False).query.get(uri)
        [enc] = query.encode_users([UserQuery(None, recent_item_ids=marked)])
        assert all(isinstance(e, RequestError) and e.status == 404 for e in query.item_vectors(marked))
        if old:
            assert enc.vector is None and enc.cold_reason == "no history item has a vector"
        else:  # the vector they gave while in the index: the one training computed for them
            np.testing.assert_array_equal(items.fused, served.fused)
            [indexed] = LocalStages(storage, preload_modalities=False).query.get(served_index).encode_users(
                [UserQuery(None, recent_item_ids=marked)])
            np.testing.assert_allclose(enc.vector, indexed.vector, atol=1e-6)


def test_version_cache_keeps_the_current_and_newest_versions():
    loads = []
    cache = VersionCache(lambda uri: loads.append(uri) or uri.upper(), keep=2)
    cache.set_current("a")
    assert cache.get("b") == "B" and cache.get("c") == "C"
    assert set(cache.loaded()) == {"c", "a"}  # "b" evicted: "a" is current, so never evicted
    assert cache.get("a") == "A" and loads == ["a", "b", "c"]


def test_version_cache_remembers_a_failed_load_for_a_while():
    calls = []

    def loader(uri):
        calls.append(uri)
        if uri == "bad":
            raise OSError("shard-00001/dataset.npy: sha256 mismatch")
        return uri.upper()

    cache = VersionCache(loader, keep=2, retry_after_s=60)
    cache.set_current("a")
    for _ in range(3):  # one load, then the remembered error
        with pytest.raises((OSError, VersionError), match="sha256 mismatch"):
            cache.get("bad")
    assert calls == ["a", "bad"]
    status = cache.status("bad")
    assert status["error"] == "OSError: shard-00001/dataset.npy: sha256 mismatch" and not status["loaded"]
    assert cache.status("bad", failed_since=time.time() + 1)["error"] is None  # failed before that: not said
    with pytest.raises(OSError):  # a rollout (set_current) tries again at once
        cache.set_current("bad")
    assert calls == ["a", "bad", "bad"] and cache.current == "a" and cache.status("a")["loaded"]
    assert VersionCache(loader, retry_after_s=0).get("a") == "A"


def test_version_cache_keeps_the_version_requests_name():
    """A stage's configured version can move ahead of the Ingress (a rollout the Ingress has not switched to,
    or that failed elsewhere): the version requests still name is not evicted by the next load."""
    cache = VersionCache(lambda uri: uri.upper(), keep=2)
    cache.set_current("v1")
    assert cache.get_loaded("v1") == "V1"  # requests name v1
    cache.set_current("v2")  # configured, never switched to by the Ingress
    cache.set_current("v3")  # configured again
    assert "v1" in cache.loaded() and "v3" in cache.loaded() and cache.in_use == "v1"
    cache.get("v2", touch=False)  # a background load does not count as a request
    assert cache.in_use == "v1" and "v1" in cache.loaded()


def test_version_cache_makes_room_before_a_load_not_after():
    """Each rollout after the first used to hold three versions while the third loaded (the stale one, the one
    serving, the new one): a replica sized for two was OOM-killed on its second rollout."""
    held = []
    cache: VersionCache = VersionCache(lambda uri: held.append(sorted(cache.loaded())) or uri.upper(), keep=2)
    cache.set_current("v1")
    assert cache.get_loaded("v1") == "V1"
    cache.set_current("v2")
    assert cache.get_loaded("v2") == "V2"  # the Ingress switched: requests name v2
    cache.set_current("v3")
    assert held == [[], ["v1"], ["v2"]], held  # v1 dropped before v3 loaded, not after
    assert set(cache.loaded()) == {"v2", "v3"}


def test_version_cache_never_evicts_the_version_it_just_loaded():
    """A load finishing while ``current`` still names the previous version (set_current switches after
    its load) must not evict itself: with keep=1 the old current stays too, until the switch."""
    cache = VersionCache(lambda uri: uri.upper(), keep=1)
    cache.set_current("a")
    assert cache.get("b") == "B" and set(cache.loaded()) == {"a", "b"}
    cache.set_current("b")
    assert cache.get("c") == "C" and set(cache.loaded()) == {"b", "c"}


def test_k_above_what_an_index_holds_returns_what_there_is(local, served_index):
    """An index with fewer eligible items than ``k`` pads its scores with -inf: the answer lists the items
    there are, and its batch mates are answered as usual (a zip over the padded scores failed the batch)."""
    stages, flow, _ = local
    items = stages.query.get(served_index).items
    n = int(items.indexed.sum())
    big, small = run(flow.search([SearchRequest(text="ceramic mug", k=1000), SearchRequest(text="ceramic mug", k=3)],
                                 ["ceramic mug", "ceramic mug"]))
    assert 0 < len(big["items"]) <= n < 1000 and len(small["items"]) == 3
    assert all(np.isfinite(x["score"]) for x in big["items"])
    assert [x["item_id"] for x in big["items"][:3]] == [x["item_id"] for x in small["items"]]
    item = str(items.ids[items.indexed][0])
    [similar] = run(flow.similar([item], [1000]))
    assert len(similar["items"]) == n - 1 and item not in {x["item_id"] for x in similar["items"]}


def test_item_lookup_never_widens_the_catalog_and_ignores_nul_tricks(local, served_index):
    from pydantic import ValidationError

    from tessera.serving.schemas import MAX_ID_LENGTH

    stages, _, _ = local
    items = stages.query.get(served_index).items
    known = str(items.ids[0])
    width = items.ids.dtype.itemsize
    rows = items.rows([known, known + "\0", "x" * 100_000, "", known])
    assert rows.tolist() == [0, -1, -1, -1, 0] and items.ids.dtype.itemsize == width
    with pytest.raises(ValidationError, match="at most 1024 characters"):
        RecommendRequest(recent_item_ids=["x" * (MAX_ID_LENGTH + 1)])


def test_without_preload_each_encoder_loads_on_first_use_and_one_load_holds_no_other(storage, served_index):
    """preload_modalities false: nothing loaded at start; a text query loads the text encoder alone, and
    while another modality's load is under way (its lock held) a text query is still answered (one lock
    for every modality made it wait for that load)."""
    import threading

    from tessera.serving.query import QueryCore

    core = QueryCore.load(storage, VersionRef.resolve(storage, served_index), preload_modalities=False)
    assert core.modalities and not any(core.has_encoder(m) for m in core.modalities)
    others = [m for m in core.modalities if m != "text"]
    with core._encoder_locks[others[0]]:  # a load of that modality in progress
        answered = []
        worker = threading.Thread(target=lambda: answered.extend(core.encode_queries([("text", "ceramic mug")])))
        worker.start()
        worker.join(timeout=120)
        assert not worker.is_alive() and isinstance(answered[0], np.ndarray)
    assert core.has_encoder("text") and not any(core.has_encoder(m) for m in others)
