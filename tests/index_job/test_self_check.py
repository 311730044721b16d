"""The job's recall self-check, a shard at a time, on an index saved in the S3 store (no Ray needed): each
shard is loaded back and measured against its own vectors, as its build task does, and the shards'
results merged as the driver merges them."""

from pathlib import Path

import numpy as np
import pytest

from tessera.index import (
    IndexConfig,
    IndexCorruptError,
    ShardedIndex,
    assign_shards,
    exact_search,
    load_shard,
    measure_recall,
    recall_at_k,
)
from tessera.index_job.config import SelfCheckConfig
from tessera.index_job.self_check import UserQueries, check_saved_shard, combine_checks, item_sample
from tessera.storage import join_uri
from tests.index.conftest import unit_rows

DESCRIPTIONS = {"item": "{n} sampled items", "user": "{n} users"}


def self_check(storage, uri, manifest, ids, vectors, cfg, users=None):
    """The job's check of a saved index: per shard (its own rows only), then merged."""
    row_of = {item: r for r, item in enumerate(ids)}
    sample = item_sample(len(ids), cfg)
    items = ([ids[r] for r in sample], vectors[sample])
    by_shard = []
    for entry in manifest.shards:
        held = set(load_shard(storage, join_uri(uri, entry.name)).id_list)
        mine = [i for i in ids if i in held]  # in catalog order, as the build task holds them
        sha = manifest.shard_manifest_sha256[entry.name]
        by_shard.append(check_saved_shard(storage, join_uri(uri, entry.name), sha, mine,
                                          vectors[[row_of[i] for i in mine]], users, items, cfg.k))
    return combine_checks(by_shard, cfg.k, DESCRIPTIONS)


def test_item_queries_exclude_their_item_and_ties_count(storage, bucket_uri):
    """Duplicate vectors (4 copies of each of 30), laid out so exact search and the shard merge keep
    different copies at the cut-off: every answer of the exact index is right, and the check says 1.0."""
    base = unit_rows(np.random.default_rng(11), 30, 16)
    ids = [f"g{g:02d}-c{c}" for g in range(30) for c in range(4)]
    shard_of = {ids[r]: s for s, rows in enumerate(assign_shards(ids, 2)) for r in rows}
    ids = [i for g in range(30) for i in sorted(ids[4 * g:4 * g + 4], key=lambda i: -shard_of[i])]
    vectors = np.stack([base[int(i[1:3])] for i in ids])  # (120, 16)
    index = ShardedIndex.from_arrays(ids, vectors, IndexConfig(), num_shards=2)
    manifest = index.save(storage, bucket_uri)
    cfg = SelfCheckConfig(item_queries=60, user_queries=0, k=10)
    checks = self_check(storage, bucket_uri, manifest, ids, vectors, cfg)
    item = checks["item"]
    assert set(checks) == {"item"} and item.num_queries == 60 and item.recall == 1.0
    assert item.query_items_excluded and item.queries == "60 sampled items"
    # the same queries scored as before (ids as sets, the item itself included) miss tied copies
    sample = np.sort(np.random.default_rng(cfg.seed).choice(len(ids), size=60, replace=False))
    found, _ = index.search(vectors[sample], 10)
    truth, _ = exact_search(vectors[sample], vectors, 10)
    assert recall_at_k(found, [[ids[r] for r in row] for row in truth]) < 0.95


def test_item_queries_do_not_count_the_item_itself(storage, bucket_uri):
    """An AH index without reordering depth: the item's own vector is always found, its nearest other
    item often not; the check reports the latter."""
    ids = [f"i{r:04d}" for r in range(3_000)]
    vectors = unit_rows(np.random.default_rng(12), 3_000, 32)
    index = ShardedIndex.from_arrays(ids, vectors, IndexConfig(mode="ah", num_neighbors=1, reorder_num_neighbors=1,
                                                               training_threads=1), num_shards=2)
    manifest = index.save(storage, bucket_uri)
    cfg = SelfCheckConfig(item_queries=100, user_queries=0, k=1)
    users = unit_rows(np.random.default_rng(13), 50, 32)
    top, _ = exact_search(users, vectors, 3)
    seen = [[ids[r] for r in row[:j % 3]] for j, row in enumerate(top)]  # 0-2 of each user's best items
    checks = self_check(storage, bucket_uri, manifest, ids, vectors, cfg, UserQueries(users, seen))
    check = checks["item"]
    sample = np.sort(np.random.default_rng(cfg.seed).choice(len(ids), size=100, replace=False))
    q = vectors[sample]
    with_self, _ = index.search(q, 1)
    assert recall_at_k(with_self, [[ids[r]] for r in sample]) >= 0.99
    without, _ = index.search(q, 1, [{ids[r]} for r in sample])
    truth, _ = exact_search(q, vectors, 1, [[r] for r in sample])
    assert check.recall == pytest.approx(recall_at_k(without, [[ids[r] for r in row] for row in truth]))
    assert check.recall < 0.85
    # user queries, their seen items excluded (a user's best items, for two thirds of them): the same figure
    # as the whole index measured in one process with those exclusions, and not the figure without them
    loaded = ShardedIndex.load(storage, bucket_uri)
    whole = measure_recall(loaded, users, ids, vectors, k=1, exclude=[set(s) for s in seen])
    assert checks["user"].recall == pytest.approx(whole.recall) and checks["user"].num_queries == 50
    assert checks["user"].recall != pytest.approx(measure_recall(loaded, users, ids, vectors, k=1).recall)
    assert not checks["user"].query_items_excluded and checks["user"].seen_items_excluded
    assert not checks["item"].seen_items_excluded


def test_a_shard_whose_saved_files_changed_fails_its_check(storage, bucket_uri):
    """The build task loads its shard back with every checksum verified: a file changed after the save
    (or a shard.json not the one the task wrote) is an error, not a recall."""
    ids = [f"i{r:03d}" for r in range(200)]
    vectors = unit_rows(np.random.default_rng(14), 200, 8)
    manifest = ShardedIndex.from_arrays(ids, vectors, IndexConfig(), num_shards=1).save(storage, bucket_uri)
    name = manifest.shards[0].name
    sha = manifest.shard_manifest_sha256[name]
    items = (ids[:5], vectors[:5])
    assert check_saved_shard(storage, join_uri(bucket_uri, name), sha, ids, vectors, None, items, 10)["item"]
    with pytest.raises(IndexCorruptError, match="sha256 does not match"):
        check_saved_shard(storage, join_uri(bucket_uri, name), "0" * 64, ids, vectors, None, items, 10)
    with pytest.raises(ValueError, match="not its 200 items"):
        check_saved_shard(storage, join_uri(bucket_uri, name), sha, ids[1:], vectors[1:], None, items, 10)


def test_a_config_without_item_queries_is_refused_naming_the_key(tmp_path):
    """Every index (the per-modality ones have no other) is checked on item queries: 0 would publish
    indexes with no recall measured, which pass any floor."""
    import yaml

    from tessera.config import ConfigError, load_config
    from tessera.index_job.config import IndexJobConfig

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "index.yaml").read_text())
    data["self_check"]["item_queries"] = 0
    path = tmp_path / "index.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=f"key 'self_check.item_queries' in file {path}"):
        load_config(IndexJobConfig, path)


def test_check_tasks_reserve_the_configured_memory():
    assert SelfCheckConfig().task_options(1.0) == {"num_cpus": 1.0}
    assert SelfCheckConfig(memory_gb=2).task_options(0.5) == {"num_cpus": 0.5, "memory": 2 << 30}


def test_a_shard_file_changed_after_the_save_fails_its_check(storage, bucket_uri):
    ids = [f"i{r:03d}" for r in range(300)]
    vectors = unit_rows(np.random.default_rng(15), 300, 8)
    config = IndexConfig(mode="ah", training_threads=1)
    manifest = ShardedIndex.from_arrays(ids, vectors, config, num_shards=1).save(storage, bucket_uri)
    name = manifest.shards[0].name
    shard_uri = join_uri(bucket_uri, name)
    victim = next(f for f in storage.list_files(shard_uri) if not f.endswith("shard.json"))
    storage.write_bytes(victim, storage.read_bytes(victim) + b"x", "application/octet-stream")
    with pytest.raises(IndexCorruptError):
        check_saved_shard(storage, shard_uri, manifest.shard_manifest_sha256[name], ids, vectors, None,
                          (ids[:5], vectors[:5]), 10)


def test_sampled_histories_keep_the_last_events_on_catalog_items():
    """Only what the user tower reads is kept (and gathered by the split tasks): events on items of the
    catalog, the last max_history of them, whether the item is in the index or not (training reads an item
    without a usable modality too); events on other items, without an item or without a user are dropped
    before the held-out event is left out; tuning users never overlap the checked ones."""
    import pyarrow as pa

    from tessera.index import hash_ids
    from tessera.index_job.self_check import sample_users

    rows = []
    for u in range(6):
        for e in range(30):
            item = None if e == 3 else f"it-{(u * 7 + e) % 40:02d}"
            rows.append((f"u{u}", item, 1_000 * (e + 1), 1.0))
    rows.append((None, "it-00", 5_000, 1.0))  # an event without a user: dropped
    table = pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                      "ts": pa.array([r[2] for r in rows], pa.int64()), "weight": [r[3] for r in rows]})
    known = np.unique(hash_ids([f"it-{i:02d}" for i in range(0, 40, 2)]))  # a catalog of the even items
    cfg = SelfCheckConfig(user_queries=3, holdout=1, seed=1)
    checked = sample_users(table, cfg, 3, max_history=5, known=known)
    tuning = sample_users(table, cfg, 3, skip=3, max_history=5, known=known)
    assert len(checked) == len(tuning) == 3
    assert not {h.user_id for h in checked} & {h.user_id for h in tuning}
    for h in checked + tuning:
        u = int(h.user_id[1:])
        events = [(f"it-{(u * 7 + e) % 40:02d}", 1_000 * (e + 1)) for e in range(30) if e != 3]
        before = [(i, t) for i, t in events if int(i[3:]) % 2 == 0][:-1]  # the last catalog event held out
        assert list(zip(h.items, h.ts.tolist(), strict=True)) == before[-5:]
        # seen: every catalog item before the held-out event, older than the history's five too
        assert h.seen == sorted({i for i, _ in before}) and len(h.seen) > len(set(h.items))
    everything = sample_users(table, cfg, 3)
    assert [len(h.items) for h in everything] == [28] * 3  # 30 events, one held out, one without an item


def test_users_are_sampled_the_same_from_a_log_in_many_chunks_or_with_dictionary_ids():
    """A log read from many Parquet files is a table of many chunks: the sample is the one a single chunk
    gives (the sampled events are taken chunk by chunk); dictionary-typed user ids whose dictionary
    repeats a value are one user."""
    import pyarrow as pa

    from tessera.index_job.self_check import sample_users, take_rows

    rng = np.random.default_rng(16)
    n = 20_000
    table = pa.table({"user_id": [f"u{u:04d}" for u in rng.integers(0, 700, n)],
                      "item_id": [f"it-{i}" for i in rng.integers(0, 3_000, n)],
                      "ts": pa.array(rng.integers(0, 10**6, n), pa.int64()),
                      "weight": rng.random(n).astype(np.float32)})
    chunked = pa.Table.from_batches(table.to_batches(max_chunksize=997))
    assert chunked.column("item_id").num_chunks > 10
    cfg = SelfCheckConfig(user_queries=50, holdout=1, seed=4)
    for one, many in zip(sample_users(table, cfg, 50, max_history=9), sample_users(chunked, cfg, 50, max_history=9),
                         strict=True):
        assert (one.user_id, one.items, one.ts.tolist(), one.weights.tolist()) == (
            many.user_id, many.items, many.ts.tolist(), many.weights.tolist())
    rows = np.array([5, n - 1, 0, 997, 996, 5])
    assert take_rows(chunked.column("item_id"), rows).to_pylist() == [table.column("item_id")[int(r)].as_py()
                                                                       for r in rows]
    ids = pa.DictionaryArray.from_arrays(pa.array([0, 1, 2, 1, 0, 1], pa.int32()), pa.array(["b", "a", "b"]))
    log = pa.table({"user_id": ids, "item_id": [f"i{j}" for j in range(6)],
                    "ts": pa.array(range(1, 7), pa.int64()), "weight": [1.0] * 6})
    got = {h.user_id: h.items for h in sample_users(log, SelfCheckConfig(holdout=0), 5)}
    assert got == {"a": ["i1", "i3", "i5"], "b": ["i0", "i2", "i4"]}


def _reference_sample(rows, cfg, count, skip=0, max_history=None, known_items=None):
    """The sample written out plainly over ``(user, item, ts, weight)`` rows: each user's events by time,
    then item id, then weight, as training orders them; events without a user, a time or an item of the
    catalog (``known_items``; None: any) are not counted (training drops them before holding any out)."""
    import pyarrow as pa

    from tessera.index_job.self_check import user_order_key
    from tessera.interactions import hash_user_ids

    by_user = {}
    for pos, (user, item, ts, weight) in enumerate(rows):
        if user is not None and ts is not None and item is not None and (known_items is None or item in known_items):
            by_user.setdefault(user, []).append((ts, False, item, weight, pos))
    names = sorted(by_user)
    hashes = hash_user_ids(pa.array(names, pa.string()), user_order_key(cfg.seed)).tolist()
    order = sorted(names, key=lambda u: (hashes[names.index(u)], u))
    out = []
    for user in [u for u in order if len(by_user[u]) > cfg.holdout][skip:skip + count]:
        events = sorted(by_user[user])
        cut = len(events) - cfg.holdout
        history = events[:cut]
        history = history[max(len(history) - max_history, 0):] if max_history is not None else history
        out.append((user, [e[2] for e in history], [e[0] for e in history], [e[3] for e in history],
                    sorted({e[2] for e in events[:cut]})))
    return out


def _as_tuples(histories):
    return [(h.user_id, h.items, h.ts.tolist(), h.weights.tolist(), h.seen) for h in histories]


@pytest.mark.parametrize("holdout,max_history", [(1, 4), (3, None), (0, 2), (0, None)])
def test_users_sampled_from_the_log_a_file_at_a_time_are_the_sample_of_the_whole_log(
        storage, bucket_uri, ray_session, holdout, max_history):
    """``select_users`` reads the log in Ray tasks, a file at a time, and keeps only the first users of the
    order (growing its budget while too few of them have enough events) and the events their histories can
    need: the same users and histories as the sample written out plainly over the whole log. Users span
    files, times tie within and across files (item, then weight decide), some events have no user, no item
    or no time, most users have too few events when the holdout is 3; one file is empty, one holds no user
    id, one has large-string user ids and dictionary item ids."""
    import pyarrow as pa

    from tessera.index import hash_ids
    from tessera.index_job.self_check import sample_users, select_users, user_order_key
    from tessera.interactions import hash_user_ids

    rng = np.random.default_rng(17 + holdout)
    rows = []
    for u in range(300):
        n = int(rng.integers(4, 40)) if rng.random() < 0.2 else int(rng.integers(1, 4))
        for _ in range(n):
            item = None if rng.random() < 0.05 else f"it-{int(rng.integers(0, 60)):02d}"
            rows.append((f"u{u:03d}", item, int(rng.integers(0, 25)) * 1000, float(rng.integers(1, 8)) / 4))
    rows += [(None, "it-00", 5_000, 1.0)] * 3 + [("u001", "it-03", None, 1.0), ("u002", None, None, 1.0)]
    rows = [rows[j] for j in rng.permutation(len(rows))]
    cfg = SelfCheckConfig(user_queries=40, holdout=holdout, seed=3)
    # two users first in the order, each with 30 events on catalog items in the last file alone: the file's
    # cut must keep enough of them for the history once the last ones are held out
    names = [f"w{j:04d}" for j in range(2000)]
    first = np.argsort(hash_user_ids(pa.array(names), user_order_key(cfg.seed)))[:2]
    for j in first:
        rows += [(names[j], f"it-{3 * (e % 20):02d}", 100_000 + 1000 * e, 1.0) for e in range(30)]
    uri = join_uri(bucket_uri, "log")
    bounds = [0, 40, 40, 300, 520, 700, len(rows) - 70, len(rows)]
    for f, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):  # the second file is empty
        chunk = rows[a:b]
        users = pa.array([r[0] for r in chunk], pa.large_string() if f == 3 else pa.string())
        items = pa.array([r[1] for r in chunk], pa.string())
        storage.write_parquet(join_uri(uri, f"part-{f:02d}.parquet"), pa.table({
            "user_id": users, "item_id": items.dictionary_encode() if f == 3 else items,
            "ts": pa.array([r[2] for r in chunk], pa.int64()), "weight": pa.array([r[3] for r in chunk],
                                                                                  pa.float32()),
            "event": ["view"] * len(chunk)}))
    storage.write_parquet(join_uri(uri, "part-99.parquet"), pa.table({  # no user id: nothing to sample
        "user_id": pa.nulls(3, pa.string()), "item_id": pa.nulls(3), "ts": pa.array([1, 2, 3], pa.int64()),
        "weight": pa.array([1.0] * 3, pa.float32()), "event": ["view"] * 3}))
    known_items = {f"it-{i:02d}" for i in range(60) if i % 7}  # events on it-00, it-07, ...: not in the catalog
    known = np.unique(hash_ids(sorted(known_items)))
    expected = _reference_sample(rows, cfg, 80, max_history=max_history, known_items=known_items)
    assert [e[0] for e in expected[:2]] == [names[j] for j in first]
    if holdout == 3:
        assert 30 < len(expected) < 80  # fewer eligible users than asked for: the budget grew to all of them
    else:
        assert len(expected) == 80
    for options in ({"num_cpus": 0.25}, None):  # Ray tasks, two files each; in this process
        got = select_users(storage, uri, cfg, 40, max_history, task_options=options, files_per_task=2, known=known)
        assert _as_tuples(got.check) == expected[:40]
        assert _as_tuples(got.tuning) == expected[40:]
    log = pa.table({"user_id": pa.array([r[0] for r in rows], pa.string()),
                    "item_id": pa.array([r[1] for r in rows], pa.string()),
                    "ts": pa.array([r[2] for r in rows], pa.int64()), "weight": [r[3] for r in rows]})
    assert _as_tuples(sample_users(log, cfg, 10, skip=5, max_history=max_history, known=known)) == expected[5:15]
    assert _as_tuples(sample_users(log, cfg, 5)) == _reference_sample(rows, cfg, 5)


def test_users_sharing_a_hash_are_told_apart(monkeypatch):
    """With every user id hashed to one of four values, the order's ties are broken by id, each user keeps
    its own events and is counted alone: the sample is still the one written out plainly."""
    import pyarrow as pa

    from tessera import interactions
    from tessera.index_job import self_check
    from tessera.index_job.self_check import sample_users

    real = interactions.hash_user_ids

    def weak(ids, key):
        return real(ids, key) & np.uint64(3)

    monkeypatch.setattr(interactions, "hash_user_ids", weak)
    monkeypatch.setattr(self_check, "hash_user_ids", weak)
    rng = np.random.default_rng(23)
    rows = [(f"u{int(rng.integers(0, 30)):02d}", f"it-{int(rng.integers(0, 20)):02d}", int(rng.integers(0, 50)), 1.0)
            for _ in range(400)]
    log = pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                    "ts": pa.array([r[2] for r in rows], pa.int64()), "weight": [r[3] for r in rows]})
    cfg = SelfCheckConfig(holdout=1, seed=2)
    expected = _reference_sample(rows, cfg, 12, skip=3, max_history=3)
    assert len(expected) == 12
    assert _as_tuples(sample_users(log, cfg, 12, skip=3, max_history=3)) == expected
    # one-event users (too few for holdout 1) sharing a hash look like one user with enough events:
    # the fetch goes on past such hashes until it has the users asked for (64 hash values here)
    def weak64(ids, key):
        return real(ids, key) & np.uint64(63)

    monkeypatch.setattr(interactions, "hash_user_ids", weak64)
    monkeypatch.setattr(self_check, "hash_user_ids", weak64)
    rows = [(f"one-{j:02d}", "it-01", j, 1.0) for j in range(30)]
    rows += [(f"many-{j}", f"it-{e:02d}", 100 + e, 1.0) for j in range(6) for e in range(4)]
    log = pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                    "ts": pa.array([r[2] for r in rows], pa.int64()), "weight": [r[3] for r in rows]})
    expected = _reference_sample(rows, cfg, 6)
    assert sorted(e[0] for e in expected) == [f"many-{j}" for j in range(6)]
    assert _as_tuples(sample_users(log, cfg, 6)) == expected
