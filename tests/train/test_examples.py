"""Time split, next-item examples, the evaluation set and the item table (numpy / torch, no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from tessera.train.catalog import ItemCatalog, vector_matrix
from tessera.train.evaluate import metrics_of_scores, quality_checks
from tessera.train.examples import (
    EXAMPLE_COLUMNS,
    HISTORY_COLUMNS,
    EvalSet,
    UserTimelines,
    history_from_batch,
    item_counts,
    next_item_examples,
    target_counts,
    user_records,
)


def _records():
    a = user_records({"user_id": np.array(["u1"] * 4), "item_row": np.array([5, 3, 9, 1]),
                      "ts": np.array([40, 10, 30, 20]), "weight": np.ones(4, np.float32)}, holdout=1)
    b = user_records({"user_id": np.array(["u2"]), "item_row": np.array([7]), "ts": np.array([1]),
                      "weight": np.ones(1, np.float32)}, holdout=1)
    return {k: np.concatenate([a[k], b[k]]) for k in a}


def test_time_split_holds_out_the_last_event_and_keeps_short_users_in_train():
    rec = _records()
    assert rec["train_items"][0].tolist() == [3, 1, 9] and rec["test_items"][0].tolist() == [5]
    assert rec["train_items"][1].tolist() == [7] and len(rec["test_items"][1]) == 0
    assert item_counts(rec, 10).tolist() == [0, 1, 0, 1, 0, 0, 0, 1, 0, 1]


def test_logq_counts_are_the_towers_targets():
    """logQ corrects for how often an item is an in-batch negative, i.e. another example's target: every
    training event was counted, the first of each user (never a target) and the ranker's tail included."""
    rng = np.random.default_rng(0)
    users = [f"u{n}" for n in rng.integers(0, 30, 400)]
    records = user_records({"user_id": np.array(users), "item_row": rng.integers(0, 50, 400),
                            "ts": rng.permutation(400), "weight": np.ones(400, np.float32)}, holdout=1)
    examples = next_item_examples(records)
    for tail in (0, 2):
        targets = examples["target"][examples["from_end"] >= tail]
        assert target_counts(records, 50, tail).tolist() == np.bincount(targets, minlength=50).tolist()
    assert target_counts(records, 50, 2).sum() < item_counts(records, 50).sum()


def test_a_user_gives_at_most_max_examples_the_most_recent_and_logq_counts_only_those():
    """A bot with 300 events and a user with 6: capped at 4 examples each, the bot's are its last 4 training
    positions (same histories as uncapped), the small user's all 4; logQ counts exactly the capped targets."""
    rng = np.random.default_rng(1)
    one = [user_records({"user_id": np.array([user] * n), "item_row": rng.integers(0, 40, n), "ts": np.arange(n),
                         "weight": np.ones(n, np.float32)}, holdout=1) for user, n in (("bot", 300), ("u", 6))]
    records = {k: np.concatenate([r[k] for r in one]) for k in one[0]}
    full = next_item_examples(records)
    capped = next_item_examples(records, max_examples=4)
    assert len(full["target"]) == 298 + 4 and len(capped["target"]) == 4 + 4
    keep = full["from_end"] < 4  # the most recent positions, the same examples
    for k in EXAMPLE_COLUMNS:
        np.testing.assert_array_equal(capped[k], full[k][keep])
    timelines = UserTimelines(records)
    for k, v in timelines.histories(capped["user_key"], capped["from_end"], 5).items():
        np.testing.assert_array_equal(v, timelines.histories(full["user_key"], full["from_end"], 5)[k][keep])
    for tail in (0, 2):
        targets = capped["target"][capped["from_end"] >= tail]
        assert target_counts(records, 40, tail, max_examples=4).tolist() == np.bincount(targets, minlength=40).tolist()


def test_popularity_counts_each_users_last_events_up_to_the_cap():
    """A bot's 300 events on one item made it the most popular of the catalog: with the cap, a user counts its
    last ``max_per_user`` events (validation ones last, when counted), and users under it count all of theirs."""
    bot = user_records({"user_id": np.array(["bot"] * 300), "item_row": np.array([7] * 290 + [3] * 10),
                        "ts": np.arange(300), "weight": np.ones(300, np.float32)}, holdout=1, validation=1)
    rng = np.random.default_rng(5)
    people = [user_records({"user_id": np.array([f"u{u}"] * 6), "item_row": rng.integers(0, 6, 6) * 2,
                            "ts": np.arange(6), "weight": np.ones(6, np.float32)}, holdout=1, validation=1)
              for u in range(40)]
    records = {k: np.concatenate([r[k] for r in [bot, *people]]) for k in bot}
    plain = item_counts(records, 12)
    assert plain.argmax() == 7 and plain[7] == 290
    capped = item_counts(records, 12, max_per_user=20)
    # the bot's last 20 events before its validation and test ones: 12 of item 7, then 8 of item 3
    bot_part = np.bincount(np.r_[[7] * 12, [3] * 8], minlength=12)
    assert capped.tolist() == (plain - np.bincount(bot["train_items"][0], minlength=12) + bot_part).tolist()
    assert capped.argmax() != 7
    # with the validation event (an item 3, after the training ones): the bot's last 20 are 11 of item 7, 9 of 3
    assert bot["val_items"][0].tolist() == [3]
    people_val = sum(np.bincount(np.r_[p["train_items"][0], p["val_items"][0]], minlength=12) for p in people)
    expected = people_val + np.bincount(np.r_[[7] * 11, [3] * 9], minlength=12)
    assert item_counts(records, 12, with_validation=True, max_per_user=20).tolist() == expected.tolist()


def test_max_examples_per_user_must_leave_the_towers_examples(tmp_path):
    import pytest

    from tessera.config import ConfigError, load_config
    from tessera.train.config import TrainConfig

    assert TrainConfig(max_examples_per_user=3).max_examples_per_user == 3  # ranker.tail 2
    path = tmp_path / "train.yaml"
    path.write_text("max_examples_per_user: 2\n")
    with pytest.raises(ConfigError, match=r"max_examples_per_user \(2\) must exceed ranker.tail \(2\)") as err:
        load_config(TrainConfig, path)
    assert str(path) in str(err.value)
    assert TrainConfig(max_examples_per_user=1, ranker={"enabled": False}).max_examples_per_user == 1


def test_a_target_the_user_had_before_is_not_evaluated():
    """Every metric leaves the user's history out of the ranking (serving leaves out what a user has seen), so
    a held-out item the user had already had could never be found: it is left out of the targets and counted,
    and a user left with none is not evaluated. u1 re-buys 3 (its test target); u2's validation target 4 is
    a repeat, its test target 2 is not."""
    def rec(user, rows):
        return user_records({"user_id": np.array([user] * len(rows)), "item_row": np.array(rows),
                             "ts": np.arange(len(rows)), "weight": np.ones(len(rows), np.float32)},
                            holdout=1, validation=1)

    one, two = rec("u1", [3, 1, 9, 3]), rec("u2", [4, 6, 4, 2])
    records = {k: np.concatenate([one[k], two[k]]) for k in one}
    test = EvalSet.from_records(records, max_history=4, split="test")
    assert [x.tolist() for x in test.test_items] == [[2]] and test.repeat_targets == 1
    assert test.train_items[0].tolist() == [4, 6, 4]
    val = EvalSet.from_records(records, max_history=4, split="validation")
    assert [x.tolist() for x in val.test_items] == [[9]] and val.repeat_targets == 1
    scores = torch.zeros(1, 10)
    scores[0, 2] = 1.0
    metrics = metrics_of_scores(scores, test, ks=(10,))
    assert metrics["recall@10"] == 1.0 and metrics["num_users"] == 1 and metrics["repeat_targets"] == 1


def test_events_at_the_same_time_split_the_same_whatever_order_they_arrive_in():
    """Ray Data's groupby hands a user's events over in no fixed order: ties on ts are broken by item."""
    events = {"user_id": np.array(["u"] * 4), "item_row": np.array([8, 2, 5, 6]), "ts": np.array([10, 30, 30, 20]),
              "weight": np.ones(4, np.float32)}
    splits = set()
    for order in ([0, 1, 2, 3], [2, 1, 0, 3], [3, 2, 1, 0]):
        rec = user_records({k: v[order] for k, v in events.items()}, holdout=1)
        splits.add((tuple(rec["train_items"][0].tolist()), tuple(rec["test_items"][0].tolist())))
    assert splits == {((8, 6, 2), (5,))}


def test_next_item_examples_use_only_earlier_items_left_padded():
    ex = next_item_examples(_records())
    assert ex["target"].tolist() == [1, 9] and set(ex) == set(EXAMPLE_COLUMNS)  # u1 positions 1, 2; u2: one event
    batch = UserTimelines(_records()).with_histories({k: torch.from_numpy(v) for k, v in ex.items()}, max_history=2)
    assert set(batch) == set(EXAMPLE_COLUMNS) | set(HISTORY_COLUMNS)
    assert batch["hist_items"].tolist() == [[0, 3], [3, 1]] and batch["hist_len"].tolist() == [1, 2]
    assert batch["hist_ts"].tolist() == [[0, 10], [10, 20]] and batch["hist_w"].dtype == torch.float32
    hist = history_from_batch(batch)
    assert hist.mask.tolist() == [[False, True], [True, True]]


def test_seen_before_is_every_training_item_before_the_target_beyond_the_history_window():
    ex = {k: torch.from_numpy(v) for k, v in next_item_examples(_records()).items()}  # u1: 3, 1, 9; targets 1, 9
    timelines = UserTimelines(_records())
    assert timelines.with_histories(ex, max_history=1)["hist_items"].tolist() == [[3], [1]]
    seen = timelines.seen_before(ex["user_key"], ex["from_end"])
    assert [x.tolist() for x in seen] == [[3], [3, 1]]


def test_histories_rebuilt_from_the_timelines_are_the_padded_histories_of_each_place():
    """The worker rebuilds each example's history from the user records: the last max_history training
    events before its target, left-padded as pad_histories pads them (what the examples used to carry),
    whatever order the records come in and for histories shorter and longer than max_history; a place
    outside the records is an error, not a wrong history."""
    import pytest

    from tessera.models import pad_histories
    from tessera.train.examples import user_keys

    rng = np.random.default_rng(3)
    one = []
    for u in range(40):
        n = int(rng.integers(1, 30))
        one.append(user_records({"user_id": np.array([f"u{u}"] * n), "item_row": rng.integers(0, 90, n),
                                 "ts": rng.integers(0, 10**12, n), "weight": rng.uniform(0.5, 2, n).astype(np.float32)},
                                holdout=1))
    records = {k: np.concatenate([r[k] for r in one]) for k in one[0]}
    ex = next_item_examples(records)
    row_of = {int(k): r for r, k in enumerate(user_keys(records["user_id"]))}
    rows = [row_of[int(k)] for k in ex["user_key"]]
    before = {c: [records[c][r][:len(records[c][r]) - 1 - b] for r, b in zip(rows, ex["from_end"], strict=True)]
              for c in ("train_items", "train_ts", "train_w")}
    reversed_records = {k: v[::-1] for k, v in records.items()}
    for n_hist in (1, 7, 40):
        got = UserTimelines(reversed_records).histories(ex["user_key"], ex["from_end"], n_hist)
        want = pad_histories(before["train_items"], n_hist, timestamps=before["train_ts"], weights=before["train_w"])
        np.testing.assert_array_equal(got["hist_items"], want.item_idx.numpy())
        np.testing.assert_array_equal(got["hist_ts"], want.timestamps_ms.numpy())
        np.testing.assert_array_equal(got["hist_w"], want.weights.numpy())
        np.testing.assert_array_equal(got["hist_len"], want.mask.numpy().sum(1))
    assert UserTimelines(records).histories(ex["user_key"][:0], ex["from_end"][:0], 4)["hist_items"].shape == (0, 4)
    with pytest.raises(KeyError, match="not among the user records"):
        UserTimelines(records).histories(np.array([12345], np.int64), np.array([0]), 4)
    with pytest.raises(ValueError, match="outside its user's training events"):
        UserTimelines(records).histories(ex["user_key"][:1], np.array([10**6]), 4)


def test_eval_set_keeps_users_with_history_and_targets():
    ev = EvalSet.from_records(_records(), max_history=4)
    assert ev.num_users == 1 and ev.test_items[0].tolist() == [5]
    assert ev.history.item_idx.tolist() == [[0, 3, 1, 9]]


def test_validation_targets_precede_the_test_and_are_never_training_targets():
    """u1 (events 3, 1, 9, 5 in time order): 5 is the test target, 9 the validation target. Validation
    ranks with the training events as history; the test with the validation event in it too (it happened
    before), and neither is ever an example's target."""
    def rec(rows, ts):
        return user_records({"user_id": np.array(["u"] * len(rows)), "item_row": np.array(rows), "ts": np.array(ts),
                             "weight": np.arange(1, len(rows) + 1, dtype=np.float32)}, holdout=1, validation=1)

    one, two, three = rec([5, 3, 9, 1], [40, 10, 30, 20]), rec([4, 2], [1, 2]), rec([6, 8, 7], [1, 2, 3])
    records = {k: np.concatenate([one[k], two[k], three[k]]) for k in one}
    assert [records["train_items"][i].tolist() for i in range(3)] == [[3, 1], [4], [6]]
    assert [records["val_items"][i].tolist() for i in range(3)] == [[9], [], [8]]  # u2: one event left, kept
    assert [records["test_items"][i].tolist() for i in range(3)] == [[5], [2], [7]]
    assert records["val_ts"][0].tolist() == [30] and records["val_w"][0].tolist() == [3.0]

    val = EvalSet.from_records(records, max_history=4, split="validation")
    assert [x.tolist() for x in val.test_items] == [[9], [8]]
    assert val.history.item_idx.tolist() == [[0, 0, 3, 1], [0, 0, 0, 6]]
    test = EvalSet.from_records(records, max_history=4, split="test")
    assert [x.tolist() for x in test.test_items] == [[5], [2], [7]]
    assert [x.tolist() for x in test.train_items] == [[3, 1, 9], [4], [6, 8]]  # left out of the test's ranking
    assert test.history.item_idx[0].tolist() == [0, 3, 1, 9]
    assert test.history.timestamps_ms[0].tolist() == [0, 10, 20, 30]
    assert test.history.weights[0].tolist() == [0.0, 2.0, 4.0, 3.0]

    targets = next_item_examples(records)["target"].tolist()
    assert targets == [1]  # u1's second training event; 9, 5, 8, 7, 2 never
    assert item_counts(records, 10).tolist() == [0, 1, 0, 1, 1, 0, 1, 0, 0, 0]
    assert item_counts(records, 10, with_validation=True).tolist() == [0, 1, 0, 1, 1, 0, 1, 0, 1, 1]


@pytest.mark.parametrize("split", ["validation", "test"])
def test_eval_set_leaves_out_each_users_repeat_targets_as_a_loop_over_users_does(split):
    """The targets already in a user's history, found for every user at once, are the ones a plain loop of
    ``np.isin`` a user finds (users of 0 to 12 events over 15 items: many repeats, some users left with no
    target); and the set comes back whole from a pickle (packed flat, as Ray stores it)."""
    import pickle

    rng = np.random.default_rng(3)
    rows = [user_records({"user_id": np.array([f"u{u}"] * n), "item_row": rng.integers(0, 15, n),
                          "ts": rng.permutation(n), "weight": np.ones(n, np.float32)}, holdout=2, validation=2)
            for u, n in enumerate(rng.integers(0, 13, 300)) if n]
    records = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    ev = EvalSet.from_records(records, max_history=4, split=split)
    want, repeats = [], 0
    for i in range(len(records["train_items"])):
        seen = np.concatenate([records["train_items"][i]] + ([records["val_items"][i]] if split == "test" else []))
        t = np.asarray(records["test_items"][i] if split == "test" else records["val_items"][i], dtype=np.int64)
        new = t[~np.isin(t, seen)]
        repeats += len(t) - len(new)
        if len(new) and len(seen):
            want.append((new.tolist(), seen.tolist()))
    assert repeats > 50 and len(want) < len(records["train_items"]) - 50  # repeats, and users left out
    assert ev.repeat_targets == repeats
    assert [(t.tolist(), h.tolist()) for t, h in zip(ev.test_items, ev.train_items, strict=True)] == want
    back = pickle.loads(pickle.dumps(ev, protocol=5))
    assert back.repeat_targets == ev.repeat_targets and torch.equal(back.history.item_idx, ev.history.item_idx)
    assert [x.tolist() for x in back.test_items] == [x.tolist() for x in ev.test_items]
    assert [x.tolist() for x in back.train_items] == [x.tolist() for x in ev.train_items]
    empty = pickle.loads(pickle.dumps(EvalSet.from_records({k: v[:0] for k, v in records.items()}, 4, split)))
    assert empty.num_users == 0 and empty.train_items == []


def test_nan_scores_are_misses_in_the_training_evaluation():
    ev = EvalSet.from_records(_records(), max_history=4)
    scores = torch.zeros(1, 10)
    scores[0, 5] = float("nan")  # the held-out item's score is NaN: it must not rank first
    scores[0, 0] = 0.5
    out = metrics_of_scores(scores, ev, ks=(10,))
    assert out["recall@10"] == 0.0 and out["mrr"] == 0.0
    scores[0, 5] = 1.0
    assert metrics_of_scores(scores, ev, ks=(10,))["ndcg@10"] == 1.0


def test_catalog_sorts_ids_and_marks_null_and_nonfinite_vectors_missing():
    dim = 3
    vecs = [np.ones(dim, np.float32), None, np.array([np.nan, 0, 0], np.float32)]
    col = vector_matrix(pa.chunked_array([pa.FixedSizeListArray.from_arrays(
        pa.array(np.concatenate([v if v is not None else np.zeros(dim, np.float32) for v in vecs])), dim,
        mask=pa.array([v is None for v in vecs]))]), dim)
    assert col[1].tolist() == [True, False, False] and np.isfinite(col[0]).all()
    table = pa.table({"item_id": ["b", "c", "a"], "text": pa.FixedSizeListArray.from_arrays(
        pa.array(np.arange(9, dtype=np.float32)), dim)})
    cat = ItemCatalog.from_table(table, {"text": dim})
    assert cat.item_ids.tolist() == ["a", "b", "c"] and cat.embeddings["text"][0].tolist() == [6, 7, 8]
    assert cat.rows(["c", "zz", "a"]).tolist() == [2, -1, 0]


def test_two_users_with_one_key_are_refused(monkeypatch):
    """An example names its user by a 64-bit key alone: two users sharing one would read each other's events
    (the lookup finds the first), so the timelines refuse them, naming both."""
    import pytest

    from tessera.train import examples

    monkeypatch.setattr(examples, "user_keys", lambda ids: np.zeros(len(ids), np.int64))
    with pytest.raises(ValueError, match=r"user ids '?u1'? and '?u2'? have the same 64-bit key"):
        UserTimelines(_records())


def test_fused_must_beat_popularity_too():
    """README's claim: fused beats every single-modality variant, id-only and popularity. The check left
    popularity out, so fused losing to it still passed."""
    results = {"fused": {"ndcg@10": 0.30}, "text": {"ndcg@10": 0.20}, "id_only": {"ndcg@10": 0.25},
               "popularity": {"ndcg@10": 0.31}}
    checks = quality_checks(results)
    assert checks["fused_beats_all"] is False and round(checks["fused_margins"]["popularity"], 4) == -0.01
    results["popularity"]["ndcg@10"] = 0.10
    assert quality_checks(results)["fused_beats_all"] is True
    assert quality_checks({"fused": {"ndcg@10": 0.3}, "popularity": {"ndcg@10": 0.1}})["fused_beats_all"] is None
