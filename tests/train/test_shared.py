"""The user data and item catalog a training run builds once and every worker reads from Ray's object store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tessera.train.examples import EvalSet, UserTimelines, item_counts, next_item_examples, target_counts, user_records
from tessera.train.shared import derive
from tests.train.conftest import tiny_train_config

NUM_ITEMS = 60


def _records(num_users: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
    """User records of a random log (users of 1 to 40 events, one a bot of 6,000), ordered by user id: ~130 kB of
    timelines, over the 100 kB below which Ray hands a task's result over inline (copied) instead of through
    its object store."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_users):
        n = 6000 if u == 7 else int(rng.integers(1, 40))
        rows.append(user_records({"user_id": np.array([f"u{u:03d}"] * n), "item_row": rng.integers(1, NUM_ITEMS, n),
                                  "ts": rng.permutation(n) * 1000, "weight": rng.random(n).astype(np.float32)},
                                 holdout=1, validation=1))
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def _assert_same_eval(a: EvalSet, b: EvalSet) -> None:
    assert a.repeat_targets == b.repeat_targets and a.num_users == b.num_users
    for name in ("item_idx", "mask", "timestamps_ms", "weights"):
        assert torch.equal(getattr(a.history, name), getattr(b.history, name)), name
    for got, want in ((a.train_items, b.train_items), (a.test_items, b.test_items)):
        assert [x.tolist() for x in got] == [x.tolist() for x in want]


def _cfg(**overrides):
    return tiny_train_config("s3://unused/embeddings", "s3://unused/out", max_examples_per_user=20, **overrides)


@pytest.mark.parametrize("ranker", [True, False])
def test_the_shared_data_is_what_each_worker_built_from_the_records(ranker):
    """Counts capped at max_examples_per_user, logQ without the ranker's tail (when the ranker trains), the
    evaluation sets of both splits: what the worker loop computed from the records before it was shared."""
    cfg, records = _cfg(ranker={"enabled": ranker}), _records()
    shared, evaluation = derive(records, cfg, NUM_ITEMS)
    assert shared.num_users == 30
    assert shared.counts.tolist() == item_counts(records, NUM_ITEMS, max_per_user=20).tolist()
    assert shared.counts.tolist() != item_counts(records, NUM_ITEMS).tolist()  # the bot's events are capped
    tail = 2 if ranker else 0
    assert shared.q_counts.tolist() == target_counts(records, NUM_ITEMS, tail, 20).tolist()
    assert shared.counts_with_val.tolist() == item_counts(records, NUM_ITEMS, with_validation=True,
                                                          max_per_user=20).tolist()
    ex = next_item_examples(records, 20)
    got = shared.timelines.histories(ex["user_key"], ex["from_end"], 8)
    want = UserTimelines(records).histories(ex["user_key"], ex["from_end"], 8)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    for split, ev in (("test", evaluation.test), ("validation", evaluation.validation)):
        ref = EvalSet.from_records(records, 8, split)
        _assert_same_eval(ev, ref)
        assert ev.num_users > 15
    assert [len(x) for x in evaluation.validation.train_items] != [len(x) for x in evaluation.test.train_items]


def test_no_validation_split_gives_no_validation_set():
    _, evaluation = derive(_records(), _cfg(validation=0, keep_epoch="last"), NUM_ITEMS)
    assert evaluation.validation is None and evaluation.test.num_users


def _rows(records: dict[str, np.ndarray]) -> list[dict]:
    """The records as the users dataset holds them, in reverse user order (the groupby's order is none)."""
    n = len(records["user_id"])
    return [{k: (v[i].tolist() if k != "user_id" else str(v[i])) for k, v in records.items()}
            for i in reversed(range(n))]


def _mapped_file(array: np.ndarray) -> str:
    """The file mapped where ``array``'s data lies in this process ('' for anonymous memory: a copy of its
    own). Ray's object store is a shared-memory file named ``plasma...``."""
    addr = array.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, *rest = line.split()
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= addr < hi:
                return rest[4] if len(rest) > 4 else ""
    return ""


def test_workers_read_one_shared_copy_of_what_one_task_derived(ray_session):
    """One task derives the user data from the users dataset (in reverse user order, as a groupby may hand it
    over); another process gets the timelines' arrays as read-only views of the object store's shared memory
    (no copy of its own) with the same histories, and the same evaluation set and counts."""
    import ray
    import ray.data

    from tessera.train.shared import share_user_data

    cfg, records = _cfg(), _records()
    users = ray.data.from_items(_rows(records), override_num_blocks=3).materialize()
    refs = share_user_data(users, cfg, NUM_ITEMS)
    ex = next_item_examples(records, 20)

    @ray.remote(num_cpus=0)
    def worker(shared_ref, eval_ref):  # passed inside a container, as in train_loop_config: not resolved
        shared = ray.get(shared_ref[0])
        t = shared.timelines
        views = [(_mapped_file(a), a.flags.writeable) for a in (t.items, t.ts, t.w, t.starts, t.keys)]
        hist = t.histories(ex["user_key"], ex["from_end"], 8)
        return views, hist, ray.get(eval_ref[0]), shared.counts

    views, hist, evaluation, counts = ray.get(worker.remote([refs.shared], [refs.evaluation]))
    assert all("plasma" in path and not writeable for path, writeable in views), views
    want_shared, want_eval = derive(records, cfg, NUM_ITEMS)
    want = want_shared.timelines.histories(ex["user_key"], ex["from_end"], 8)
    assert all(np.array_equal(hist[k], want[k]) for k in want)
    _assert_same_eval(evaluation.test, want_eval.test)
    _assert_same_eval(evaluation.validation, want_eval.validation)
    assert counts.tolist() == ray.get(refs.counts).tolist() == want_shared.counts.tolist()


def test_a_log_without_users_is_refused_by_name(ray_session):
    import ray
    import ray.data

    from tessera.train.shared import share_user_data

    empty = ray.data.from_items([{"user_id": "u"}]).filter(lambda r: r["user_id"] != "u").materialize()
    with pytest.raises(ValueError, match="no user records"):  # on the driver, before any worker waits on it
        share_user_data(empty, _cfg(), NUM_ITEMS)


def test_the_catalog_is_read_once_and_workers_wrap_the_shared_arrays(sample_embeddings, storage, ray_session):
    """Another process builds the catalog over the object store's arrays (tensors sharing their memory, no
    copy): the same ids, embeddings and present masks as the embedding run read from storage."""
    import ray

    from tessera.train.catalog import ItemCatalog
    from tessera.train.shared import share_catalog

    cfg = tiny_train_config(sample_embeddings["output"]["uri"], "s3://unused/out")
    ref = share_catalog(cfg).arrays

    @ray.remote(num_cpus=0)
    def worker(refs):
        catalog = ItemCatalog.from_arrays(ray.get(refs[0])).to("cpu")
        mapped = {m: _mapped_file(e.numpy()) for m, e in catalog.embeddings.items()}
        return mapped, catalog.item_ids, catalog.embeddings, catalog.present

    mapped, ids, embeddings, present = ray.get(worker.remote([ref]))
    want = ItemCatalog.load(storage, cfg.embeddings_uri)
    assert sorted(mapped) == ["audio", "image", "text"] and all("plasma" in f for f in mapped.values()), mapped
    assert ids.tolist() == want.item_ids.tolist() and len(ids) == 160
    for m in want.modalities:
        assert torch.equal(embeddings[m], want.embeddings[m]) and torch.equal(present[m], want.present[m])
    assert not all(bool(p.all()) for p in present.values())  # failed items' rows are absent, as read


def test_a_write_through_a_catalog_tensor_is_caught_before_the_bundle(sample_embeddings, ray_session):
    """Ray maps its object store writable and torch drops numpy's read-only flag: an in-place write to a
    catalog tensor changes the shared copy itself (every worker's, and the bundle's). Nothing writes it;
    the driver's check before it builds the bundle would catch a change that did."""
    import ray

    from tessera.train.catalog import ItemCatalog
    from tessera.train.shared import share_catalog

    refs = share_catalog(tiny_train_config(sample_embeddings["output"]["uri"], "s3://unused/out"))
    refs.check_unchanged()
    catalog = ItemCatalog.from_arrays(ray.get(refs.arrays))
    catalog.embeddings["text"][0, 0] += 1.0  # what no training code may do
    assert float(ItemCatalog.from_arrays(ray.get(refs.arrays)).embeddings["text"][0, 0]) == float(
        catalog.embeddings["text"][0, 0])  # the same memory: the write went through to the shared copy
    with pytest.raises(RuntimeError, match="changed while they trained"):
        refs.check_unchanged()


def test_a_missing_embedding_run_or_one_that_changed_is_an_error_on_the_driver(sample_embeddings, bucket_uri,
                                                                                ray_session):
    import ray.data

    from tessera.train.shared import share_catalog, share_run_data

    missing = f"{bucket_uri}/no-such-run"
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        share_catalog(tiny_train_config(missing, "s3://unused/out"))
    records = _records()
    users = ray.data.from_items(_rows(records), override_num_blocks=2).materialize()
    cfg = tiny_train_config(sample_embeddings["output"]["uri"], "s3://unused/out")
    with pytest.raises(RuntimeError, match="holds 160 items, 159 when the training data was built"):
        share_run_data(users, cfg, 159)
    assert share_run_data(users, cfg, 160).catalog.num_items == 160
