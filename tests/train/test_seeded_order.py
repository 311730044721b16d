"""One seed, one order: the examples' order, each worker's rows and its batches depend on the rows and the seed,
not on how Ray Data cut them into blocks or in which order its tasks finished (real Ray Data)."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.train.examples import user_keys


def _examples(users: int = 60, per_user: int = 7) -> list[dict]:
    keys = user_keys(np.array([f"u{u}" for u in range(users)]))
    return [{"user_key": int(keys[u]), "from_end": e, "target": u * 100 + e} for u in range(users)
            for e in range(per_user)]


def _ordered(rows: list[dict], seed: int, blocks: int) -> list[int]:
    import ray.data

    from tessera.train.datasets import seeded_order

    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds.context.execution_options.preserve_order = True  # as build_datasets runs it
    return [r["target"] for r in seeded_order(ds, seed).materialize().take_all()]


def test_the_examples_order_is_the_seeds_whichever_blocks_and_order_they_came_in(ray_session):
    rows = _examples()
    first = _ordered(rows, seed=3, blocks=1)
    assert _ordered(rows[::-1], seed=3, blocks=7) == first  # other blocks, the rows the other way round
    assert sorted(first) == sorted(r["target"] for r in rows)  # each example once
    assert _ordered(rows, seed=4, blocks=1) != first
    # shuffled across users: a user's examples do not follow each other (7 of 420 would by chance)
    same_user_next = sum(a // 100 == b // 100 for a, b in zip(first[:-1], first[1:], strict=True))
    assert same_user_next < 25, same_user_next


def _batches(ds, seed, drop_last, window=4, batch_size=8):
    from tessera.train.worker import seeded_batches

    return [b["target"].tolist() for b in seeded_batches(ds.iterator(), batch_size, window, seed, drop_last, "cpu")]


def test_seeded_batches_depend_on_the_rows_and_the_seed_not_the_blocks(ray_session):
    import ray.data

    rows = [{"target": n, "x": float(n)} for n in range(100)]
    one = _batches(ray.data.from_items(rows, override_num_blocks=1).materialize(), 5, drop_last=False)
    many = _batches(ray.data.from_items(rows, override_num_blocks=13).materialize(), 5, drop_last=False)
    assert one == many
    assert [len(b) for b in one] == [8] * 12 + [4]  # the short batch only at the end
    assert sorted(sum(one, [])) == list(range(100))
    # rows move within their window of 4 batches (32 rows), not beyond it
    for w in range(4):
        window = sum(one[4 * w:4 * w + 4], [])
        assert sorted(window) == list(range(32 * w, min(32 * w + 32, 100)))
    assert one[0] != list(range(8))
    assert _batches(ray.data.from_items(rows).materialize(), 6, drop_last=False) != one
    dropped = _batches(ray.data.from_items(rows, override_num_blocks=3).materialize(), 5, drop_last=True)
    assert dropped == one[:-1]


def test_each_worker_takes_a_fixed_range_of_rows(ray_session):
    """row_ranges: rank r reads rows [r * (n // w), (r + 1) * (n // w)) of the materialised order, whichever
    blocks hold them (the last n % w rows left out, so every rank runs as many steps); other datasets are
    passed on whole."""
    import ray.data

    from tessera.train.job import row_ranges

    whole = ray.data.from_items([{"n": n} for n in range(5)]).materialize()
    for blocks in (1, 5):
        ds = ray.data.from_items([{"n": n} for n in range(101)], override_num_blocks=blocks).materialize()
        ranker = ray.data.from_items([{"n": n} for n in range(7)], override_num_blocks=blocks).materialize()
        parts = row_ranges({"train": ds, "ranker": ranker, "users": whole}, 3)
        assert sorted(parts) == ["ranker.0", "ranker.1", "ranker.2", "train.0", "train.1", "train.2", "users"]
        assert [[r["n"] for r in parts[f"train.{rank}"].iter_rows()] for rank in range(3)] == \
            [list(range(0, 33)), list(range(33, 66)), list(range(66, 99))], blocks
        assert [[r["n"] for r in parts[f"ranker.{rank}"].iter_rows()] for rank in range(3)] == [[0, 1], [2, 3], [4, 5]]
        assert parts["users"] is whole


def test_users_are_read_in_user_id_order(ray_session):
    import ray.data

    from tessera.train.shared import users_table

    rows = [{"user_id": f"u{n}", "train_items": np.arange(n % 3)} for n in (5, 1, 9, 3)]
    table = users_table(ray.data.from_items(rows, override_num_blocks=2).materialize().iterator())
    assert table["user_id"].tolist() == ["u1", "u3", "u5", "u9"]
    assert [len(x) for x in table["train_items"]] == [1, 0, 2, 0]


@pytest.mark.parametrize("drop_last", [True, False])
def test_seeded_batches_of_an_empty_shard_are_none(ray_session, drop_last):
    import ray.data

    empty = ray.data.from_items([{"target": 1}]).filter(lambda r: r["target"] < 0).materialize()
    assert _batches(empty, 0, drop_last) == []
