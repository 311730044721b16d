"""Same-time events: training, the index self-check and serving put a user's events in one order.

Which of two same-time events is held out, and which one a history ends with, decides what the user tower
reads. Training receives a user's events in Ray Data's shuffle order, so its order cannot be the log's; the
self-check and the serving snapshot read the log in file order. Before they shared one order
(:func:`tessera.interactions.event_order`), a log with second-resolution times gave the three different
histories for the same user."""

import numpy as np
import pyarrow as pa

from tessera.index_job.config import SelfCheckConfig
from tessera.index_job.self_check import select_users
from tessera.serving.query import UserHistories
from tessera.serving.version import ItemVectors
from tessera.storage import join_uri
from tessera.train.examples import user_records


def _tied_log(rng: np.random.Generator) -> list[tuple[str, str, int, float]]:
    """30 users, 12-20 events each over 4 distinct times (so every time holds several events), items and
    weights drawn with repeats (same time, same item, two weights), rows shuffled out of any order."""
    rows = []
    for u in range(30):
        for _ in range(int(rng.integers(12, 21))):
            rows.append((f"user-{u:02d}", f"it-{int(rng.integers(0, 25)):02d}", int(rng.integers(0, 4)) * 1000,
                         float(rng.integers(1, 3))))
    return [rows[j] for j in rng.permutation(len(rows))]


def test_training_self_check_and_serving_order_same_time_events_alike(storage, bucket_uri):
    rng = np.random.default_rng(21)
    log = _tied_log(rng)
    ids = np.asarray(sorted(f"it-{i:02d}" for i in range(25)))
    row_of = {item: r for r, item in enumerate(ids.tolist())}
    uri = join_uri(bucket_uri, "log")
    for f, (a, b) in enumerate([(0, len(log) // 3), (len(log) // 3, len(log))]):  # users span both files
        chunk = log[a:b]
        storage.write_parquet(join_uri(uri, f"part-{f}.parquet"), pa.table({
            "user_id": [r[0] for r in chunk], "item_id": [r[1] for r in chunk],
            "ts": pa.array([r[2] for r in chunk], pa.int64()), "weight": [r[3] for r in chunk]}))

    # training: each user's events in another arrival order (a shuffle), one record with nothing held out
    trained = {}
    for user in sorted({r[0] for r in log}):
        events = [r for r in log if r[0] == user]
        events = [events[j] for j in rng.permutation(len(events))]
        rec = user_records({"user_id": np.asarray([e[0] for e in events]),
                            "item_row": np.asarray([row_of[e[1]] for e in events]),
                            "ts": np.asarray([e[2] for e in events]), "weight": np.asarray([e[3] for e in events])},
                           holdout=0)
        trained[user] = list(zip(ids[rec["train_items"][0]].tolist(), rec["train_ts"][0].tolist(),
                                 rec["train_w"][0].tolist(), strict=True))
    assert any(len({t for _, t, _ in h}) < len(h) for h in trained.values())  # ties to order

    served = UserHistories.load(storage, uri, _all_indexed(ids), max_history=100)
    sample = select_users(storage, uri, SelfCheckConfig(user_queries=30, holdout=1, seed=3), 0)
    assert len(sample.check) == 30
    for h in sample.check:
        snap = served.of(h.user_id)
        assert list(zip(ids[snap.rows].tolist(), snap.ts.tolist(), snap.weights.tolist(), strict=True)) \
            == trained[h.user_id]
        # the self-check holds the last event out, as training's holdout=1 would
        assert list(zip(h.items, h.ts.tolist(), h.weights.tolist(), strict=True)) == trained[h.user_id][:-1]


def test_the_three_readers_take_an_untidy_log_alike(storage, bucket_uri, ray_session):
    """A log as real ones come: integer ids in one file, strings in another, floats (pandas' ints with a null)
    and binary in a third; times as timestamp[us, UTC] and int64 ms; no weight column in one file and null /
    NaN / infinite weights in another; events without a user, an item or a time, and on an item outside the
    catalog. Training (Ray Data), the self-check and serving all read the same events: microseconds were
    taken for milliseconds, a NaN weight made the user vector NaN, training made one user of every event
    without a user id, and the self-check held out events training drops."""
    from tessera.train.datasets import read_interactions

    rng = np.random.default_rng(8)
    ids = np.asarray(sorted(str(100 + i) for i in range(25)))
    row_of = {item: r for r, item in enumerate(ids.tolist())}
    events = [(f"{u}", str(100 + int(rng.integers(0, 25))), int(rng.integers(0, 50)) * 1000,
               float(rng.integers(1, 4))) for u in range(12) for _ in range(int(rng.integers(6, 12)))]
    events = [events[j] for j in rng.permutation(len(events))]
    half = len(events) // 2
    a, b = events[:half], events[half:]
    uri = join_uri(bucket_uri, "log")
    storage.write_parquet(join_uri(uri, "part-0.parquet"), pa.table({  # ints, microseconds, no weight column
        "user_id": pa.array([int(e[0]) for e in a], pa.int64()), "item_id": pa.array([int(e[1]) for e in a]),
        "ts": pa.array([e[2] * 1000 for e in a], pa.timestamp("us", tz="UTC"))}))
    weights = [None if j % 5 == 0 else float("nan") if j % 7 == 0 else float("inf") if j % 11 == 0 else e[3]
               for j, e in enumerate(b)]
    storage.write_parquet(join_uri(uri, "part-1.parquet"), pa.table({
        "user_id": [e[0] for e in b] + [None, "3"], "item_id": [e[1] for e in b] + ["101", "102"],
        "ts": pa.array([e[2] for e in b] + [5, None], pa.int64()), "weight": weights + [1.0, 1.0],
        "event": ["view"] * (len(b) + 2)}))
    # each user's latest events: one without an item, one on an item outside the catalog (all readers drop
    # both, so neither is the one held out); user ids as pandas writes ints with a null, item ids as binary
    late = [(float(u), item, 90_000 + u) for u in range(12) for item in (None, b"999")] + [(None, b"101", 7)]
    storage.write_parquet(join_uri(uri, "part-2.parquet"), pa.table({
        "user_id": pa.array([e[0] for e in late], pa.float64()), "item_id": pa.array([e[1] for e in late], pa.binary()),
        "ts": pa.array([e[2] for e in late], pa.int64()), "weight": [2.0] * len(late)}))
    truth = {}
    for j, (user, item, ts, w) in enumerate(a + b):
        weight = 1.0 if j < half or weights[j - half] is None or not np.isfinite(weights[j - half]) else w
        truth.setdefault(user, []).append((item, ts, weight))
    expected = {u: sorted(ev, key=lambda e: (e[1], e[0], e[2])) for u, ev in truth.items()}

    trained = {}
    rows = read_interactions(storage, uri).take_all()
    assert len(rows) == len(events) + 12  # events without a user, an item or a time left out
    for user in expected:
        mine = [r for r in rows if r["user_id"] == user and r["item_id"] in row_of]  # training's unknown items
        rec = user_records({"user_id": np.asarray([r["user_id"] for r in mine]),
                            "item_row": np.asarray([row_of[r["item_id"]] for r in mine]),
                            "ts": np.asarray([r["ts"] for r in mine]),
                            "weight": np.asarray([r["weight"] for r in mine])},
                           holdout=0)
        trained[user] = list(zip(ids[rec["train_items"][0]].tolist(), rec["train_ts"][0].tolist(),
                                 rec["train_w"][0].tolist(), strict=True))
    assert trained == expected

    served = UserHistories.load(storage, uri, _all_indexed(ids), max_history=100)
    for user, want in expected.items():
        snap = served.of(user)
        assert list(zip(ids[snap.rows].tolist(), snap.ts.tolist(), snap.weights.tolist(), strict=True)) == want
    from tessera.index import hash_ids

    catalog = np.unique(hash_ids(ids.tolist()))  # the index job's catalog: every item of its vectors parts
    for options in (None, {"num_cpus": 0.25}):
        sample = select_users(storage, uri, SelfCheckConfig(user_queries=12, holdout=1, seed=3), 0,
                              task_options=options, known=catalog)
        assert len(sample.check) == 12
        for h in sample.check:
            assert list(zip(h.items, h.ts.tolist(), h.weights.tolist(), strict=True)) == expected[h.user_id][:-1]


def test_a_log_file_of_unreadable_columns_is_named_by_every_reader(storage, bucket_uri, ray_session):
    """Times as text: each reader stops with the file and the column named (training's error comes out of
    Ray Data, the self-check's out of a Ray task: log_schema_error finds it behind their wrapping)."""
    import pytest

    from tessera.interactions import LogSchemaError, log_schema_error
    from tessera.serving.version import VersionError
    from tessera.train.datasets import read_interactions

    uri = join_uri(bucket_uri, "log")
    bad = join_uri(uri, "part-0.parquet")
    storage.write_parquet(bad, pa.table({"user_id": ["u"], "item_id": ["it-01"], "ts": ["2024-12-05"],
                                         "weight": [1.0]}))
    said = f"interaction log {bad}: column 'ts' of type string: times must be int64 milliseconds"
    with pytest.raises(Exception) as err:
        read_interactions(storage, uri).take_all()
    assert said in str(log_schema_error(err.value))
    with pytest.raises(Exception) as err:
        select_users(storage, uri, SelfCheckConfig(user_queries=1, holdout=1), 0, task_options={"num_cpus": 0.25})
    assert isinstance(log_schema_error(err.value), LogSchemaError) and said in str(log_schema_error(err.value))
    ids = np.asarray(["it-01"])
    with pytest.raises(VersionError, match="interaction-log snapshot: interaction log .*column 'ts'"):
        UserHistories.load(storage, uri, _all_indexed(ids), max_history=5)


def test_training_reads_a_log_file_a_row_group_at_a_time(tmp_path):
    """iter_log_file (training's reader) gives the file read_log_file gives, one row group per piece (a
    multi-GB file was held whole, then copied by the conversion), and names a file that is not Parquet."""
    import pyarrow.parquet as pq
    import pytest

    from tessera.interactions import LogSchemaError, iter_log_file, read_log_file
    from tessera.storage import Storage, StorageConfig

    path = str(tmp_path / "part-0.parquet")
    pq.write_table(pa.table({"user_id": list(range(10)), "item_id": ["a"] * 10, "ts": list(range(10))}), path,
                   row_group_size=3)
    storage = Storage(StorageConfig())
    pieces = list(iter_log_file(storage, path))
    assert [p.num_rows for p in pieces] == [3, 3, 3, 1]
    assert pa.concat_tables(pieces).equals(read_log_file(storage, path))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(LogSchemaError, match="bad.parquet: cannot be read as Parquet"):
        list(iter_log_file(storage, str(tmp_path / "bad.parquet")))


def _all_indexed(ids) -> ItemVectors:
    """A catalog of ``ids`` whose every item is in the index (the vectors are not read here)."""
    n = len(ids)
    return ItemVectors(ids=np.asarray(ids), fused=np.zeros((n, 4), np.float32), has_vector=np.ones(n, bool),
                       indexed=np.ones(n, bool))


def test_a_log_of_seconds_or_nanoseconds_is_named_and_one_of_milliseconds_is_not():
    """Integer times are taken as milliseconds; a log of Unix seconds read that way has every gap 1000x too
    short, and nothing failed. Training now warns (printed, and in the bundle manifest)."""
    from tessera.interactions import ts_unit_warning

    seconds = (1_700_000_000, 1_705_000_000)  # Nov 2023 - Jan 2024 as seconds
    warning = ts_unit_warning(*seconds)
    assert warning and "looks like seconds" in warning and "1970-01-20" in warning
    nanos = ts_unit_warning(1_700_000_000 * 10**9, 1_705_000_000 * 10**9)
    assert nanos and "microseconds or nanoseconds" in nanos and "past the year 9999" in nanos
    assert ts_unit_warning(1_700_000_000_000, 1_705_000_000_000) is None  # milliseconds
    assert ts_unit_warning(0, 5_000_000) is None  # small synthetic times: no dates at all
    assert ts_unit_warning(1_000, 1_705_000_000) is None  # not all of them date-like as seconds
    assert ts_unit_warning(None, None) is None  # an empty log
    # the way out the warning names: the same int64 seconds typed timestamp[s] read as milliseconds
    from tessera.interactions import normalize_log

    assert "pa.timestamp('s')" in warning
    table = pa.table({"user_id": ["u", "u"], "item_id": ["a", "b"], "ts": pa.array(seconds, pa.int64()).cast(
        pa.timestamp("s"))})
    assert normalize_log(table, "(a table)").column("ts").to_pylist() == [t * 1000 for t in seconds]
