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

    served = UserHistories.load(storage, uri, ItemVectors(ids=ids, fused=np.zeros((25, 4), np.float32),
                                                          indexed=np.ones(25, bool)), max_history=100)
    sample = select_users(storage, uri, SelfCheckConfig(user_queries=30, holdout=1, seed=3), 0)
    assert len(sample.check) == 30
    for h in sample.check:
        snap = served.of(h.user_id)
        assert list(zip(ids[snap.rows].tolist(), snap.ts.tolist(), snap.weights.tolist(), strict=True)) \
            == trained[h.user_id]
        # the self-check holds the last event out, as training's holdout=1 would
        assert list(zip(h.items, h.ts.tolist(), h.weights.tolist(), strict=True)) == trained[h.user_id][:-1]
