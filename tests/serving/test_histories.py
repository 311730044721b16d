"""The serving snapshot of the interaction log (UserHistories), read a file at a time from the real S3 store,
against the same snapshot written out plainly over the whole log."""

import numpy as np
import pyarrow as pa
import pytest

from tessera.serving.query import UserHistories
from tessera.serving.version import ItemVectors, VersionError
from tessera.storage import join_uri


def _catalog(num_items: int = 40) -> ItemVectors:
    ids = np.asarray(sorted(f"it-{i:02d}" for i in range(num_items)))
    # every fourth item is out of the index (no usable modality) but has a vector, as training reads it; every
    # seventh has none (an index built before every item had one): only those leave the histories
    has_vector = np.asarray([i % 7 != 6 for i in range(num_items)])
    indexed = has_vector & np.asarray([i % 4 != 3 for i in range(num_items)])
    return ItemVectors(ids=ids, fused=np.zeros((num_items, 4), np.float32), has_vector=has_vector, indexed=indexed)


def _reference(rows, items: ItemVectors, max_history: int) -> dict:
    """user -> (history rows, ts, weights, last_ts, seen rows) over ``(user, item, ts, weight)`` events:
    by time, then catalog row (the id's order), then weight, as training orders them."""
    row_of = {item: r for r, item in enumerate(items.ids.tolist())}
    by_user = {}
    for pos, (user, item, ts, weight) in enumerate(rows):
        if user is not None and item in row_of and ts is not None:
            by_user.setdefault(user, []).append((ts, row_of[item], weight, pos))
    out = {}
    for user, events in by_user.items():
        events.sort()
        usable = [e for e in events if items.has_vector[e[1]]][-max_history:]
        out[user] = ([e[1] for e in usable], [e[0] for e in usable], [e[2] for e in usable], events[-1][0],
                     sorted({e[1] for e in events}))
    return out


def test_snapshot_read_a_file_at_a_time_is_the_plain_snapshot(storage, bucket_uri):
    """Users spanning files, times tied within and across files (item, then weight decide), repeated items (seen once),
    events on items outside the catalog (dropped, counted) or without a user or a time (ignored), a user whose every
    event is outside the catalog (unknown), dictionary-typed ids in one file, an empty file."""
    items = _catalog()
    rng = np.random.default_rng(5)
    rows = []
    for u in range(60):
        for _ in range(int(rng.integers(1, 30))):
            item = f"it-{int(rng.integers(0, 48)):02d}" if rng.random() > 0.03 else None  # it-40.. not in catalog
            rows.append((f"user-{u:02d}", item, int(rng.integers(0, 20)) * 100, float(rng.integers(1, 9)) / 8))
    rows += [("outsider", "it-45", 50, 1.0), (None, "it-01", 60, 1.0), ("user-00", "it-02", None, 1.0)]
    rows = [rows[j] for j in rng.permutation(len(rows))]
    uri = join_uri(bucket_uri, "log")
    bounds = [0, 100, 100, 350, len(rows)]
    for f, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        chunk = rows[a:b]
        users = pa.array([r[0] for r in chunk], pa.string())
        storage.write_parquet(join_uri(uri, f"part-{f}.parquet"), pa.table({
            "user_id": users.dictionary_encode() if f == 2 else users,
            "item_id": pa.array([r[1] for r in chunk], pa.string()),
            "ts": pa.array([r[2] for r in chunk], pa.int64()), "event": ["view"] * len(chunk),
            "weight": pa.array([r[3] for r in chunk], pa.float64())}))
    storage.write_parquet(join_uri(uri, "part-9.parquet"), pa.table({  # times of Arrow type null: ignored
        "user_id": ["user-00", "user-01"], "item_id": ["it-02", "it-45"], "ts": pa.nulls(2),
        "event": ["view"] * 2, "weight": [1.0, 1.0]}))
    histories = UserHistories.load(storage, uri, items, max_history=5)
    expected = _reference(rows, items, 5)
    assert sorted(histories.user_ids()) == sorted(expected) and histories.num_users == 60
    assert histories.dropped == sum(1 for r in rows if r[0] is not None and r[2] is not None
                                    and r[1] not in set(items.ids.tolist()))
    for user, (hist, ts, weights, last_ts, seen) in expected.items():
        snap = histories.of(user)
        assert snap.rows.tolist() == hist and snap.ts.tolist() == ts and snap.weights.tolist() == weights
        assert snap.last_ts == last_ts and snap.seen.tolist() == seen
    assert histories.of("outsider") is None and histories.of("user-99") is None and histories.of("") is None
    assert UserHistories.load(storage, None, items, 5).of("user-01") is None
    with pytest.raises(VersionError, match="no interaction parts"):
        UserHistories.load(storage, join_uri(bucket_uri, "nothing"), items, 5)


def test_two_user_ids_sharing_a_hash_stay_two_users(storage, bucket_uri, monkeypatch):
    """The lookup confirms the id itself: with every id hashed to one of two values, users are not mixed."""
    from tessera import interactions

    real = interactions.hash_user_ids
    monkeypatch.setattr(interactions, "hash_user_ids", lambda ids, key: real(ids, key) & np.uint64(1))
    items = _catalog()
    rows = [(f"u{u}", f"it-{u:02d}", u, 1.0) for u in range(10)]
    storage.write_parquet(join_uri(bucket_uri, "log", "part-0.parquet"), pa.table({
        "user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
        "ts": pa.array([r[2] for r in rows], pa.int64()), "weight": [r[3] for r in rows]}))
    histories = UserHistories.load(storage, join_uri(bucket_uri, "log"), items, max_history=5)
    assert len(set(histories.hashes.tolist())) <= 2
    for u in range(10):
        assert histories.of(f"u{u}").seen.tolist() == [u]
    assert histories.of("u10") is None
