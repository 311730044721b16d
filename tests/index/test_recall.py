"""measure_recall, the self-check's measure: item queries leave their own item out, ties at the cut-off count."""

import numpy as np
import pytest

from tessera.index import (
    IndexConfig,
    ShardedIndex,
    assign_shards,
    combine_recall,
    exact_search,
    measure_recall,
    recall_at_k,
    shard_recall,
)
from tests.index.conftest import unit_rows


def _set_recall(index, queries, ids, vectors, k, exclude=None):
    """Recall as ids compared as sets (the measure before ties counted), with optional exclusions."""
    found, _ = index.search(queries, k, exclude)
    rows = None if exclude is None else [[ids.index(i) for i in ex] for ex in exclude]
    truth, _ = exact_search(queries, vectors, k, rows)
    return recall_at_k(found, [[ids[r] for r in row if r >= 0] for row in truth])


def test_item_queries_leave_their_own_item_out(small_catalog):
    """An approximate index (AH, no reordering to speak of) finds an item's own vector every time, but its
    nearest other item far less often: counting the item itself would report recall@1 of about 1."""
    ids, vectors = small_catalog
    index = ShardedIndex.from_arrays(ids, vectors, IndexConfig(mode="ah", num_neighbors=1, reorder_num_neighbors=1,
                                                               training_threads=1), num_shards=2)
    queries, query_ids = vectors[:200], ids[:200]
    with_self = measure_recall(index, queries, ids, vectors, k=1)
    check = measure_recall(index, queries, ids, vectors, k=1, query_ids=query_ids)
    assert with_self.recall >= 0.99 and not with_self.query_items_excluded
    assert check.query_items_excluded and check.num_queries == 200 and check.tie_tolerance == 1e-5
    # random vectors have no ties: the measure is the plain recall of the searches without the item
    assert check.recall == pytest.approx(_set_recall(index, queries, ids, vectors, 1, [{i} for i in query_ids]))
    assert check.recall < 0.8


@pytest.fixture(scope="module")
def duplicated():
    """50 distinct vectors, 4 copies each, copies laid out so that exact search (ties to the lower row)
    and the shard merge (ties to the lower shard) keep different copies of a group cut at the k-th place."""
    base = unit_rows(np.random.default_rng(3), 50, 16)
    ids = [f"g{g:02d}-c{c}" for g in range(50) for c in range(4)]
    shard_of = {ids[r]: s for s, rows in enumerate(assign_shards(ids, 3)) for r in rows}
    ordered = [i for g in range(50) for i in sorted(ids[4 * g:4 * g + 4], key=lambda i: -shard_of[i])]
    vectors = np.stack([base[int(i[1:3])] for i in ordered])  # (200, 16)
    index = ShardedIndex.from_arrays(ordered, vectors, IndexConfig(), num_shards=3)
    assert [s.params.mode for s in index.shards] == ["brute_force"] * 3
    return ordered, vectors, index


def test_ties_at_the_cut_off_count_as_hits(duplicated):
    ids, vectors, index = duplicated
    users = unit_rows(np.random.default_rng(4), 40, 16)  # top-10: 4 + 4 copies, then 2 of a group of 4
    assert _set_recall(index, users, ids, vectors, 10) < 0.95  # an exact index, yet misses as sets
    assert measure_recall(index, users, ids, vectors, k=10).recall == 1.0
    items = vectors[::3]  # an item's 3 twins, then 4 + 3 of the next groups: cut inside a group again
    query_ids = ids[::3]
    assert _set_recall(index, items, ids, vectors, 10, [{i} for i in query_ids]) < 0.95
    assert measure_recall(index, items, ids, vectors, k=10, query_ids=query_ids).recall == 1.0


def test_a_worse_item_is_no_tie(duplicated):
    """The tolerance covers rounding only: an index answering with the next group instead of a tied
    copy loses that hit."""
    ids, vectors, index = duplicated
    query = vectors[:1]  # group g00: its 3 other copies and the query item itself tie at score 1
    full = measure_recall(index, query, ids, vectors, k=4)
    assert full.recall == 1.0
    partial = ShardedIndex([index.shards[0]])  # the copies in the other shards are not there to be found
    held = sum(i.startswith("g00-") for i in index.shards[0].id_list)
    assert 1 <= held < 4
    assert measure_recall(partial, query, ids, vectors, k=4).recall == pytest.approx(held / 4)


def _by_shard(index, ids, vectors, queries, k, query_ids=None, ordered_as_catalog=True, exclude=None):
    """Each shard's share, measured against its own rows only (listed in catalog order, or the shard's)."""
    row_of = {item: r for r, item in enumerate(ids)}
    parts = []
    for shard in index.shards:
        held = set(shard.id_list)
        mine = [i for i in ids if i in held] if ordered_as_catalog else shard.id_list
        parts.append(shard_recall(shard, vectors[[row_of[i] for i in mine]], queries, k, query_ids=query_ids,
                                  ids=mine, exclude=exclude))
    return combine_recall(parts, k, query_items_excluded=query_ids is not None,
                          seen_items_excluded=exclude is not None)


def test_the_shards_shares_combine_to_the_whole_index_figure(small_catalog):
    """AH shards that miss often: the merged shares give measure_recall's figure exactly, with and without
    the query items excluded, for many queries and for one."""
    ids, vectors = small_catalog
    index = ShardedIndex.from_arrays(ids, vectors, IndexConfig(mode="ah", num_neighbors=2, reorder_num_neighbors=2,
                                                               training_threads=1), num_shards=3)
    for queries, query_ids in ((vectors[:150], ids[:150]), (vectors[:150], None), (vectors[7:8], ids[7:8])):
        whole = measure_recall(index, queries, ids, vectors, k=10, query_ids=query_ids)
        parts = _by_shard(index, ids, vectors, queries, 10, query_ids, ordered_as_catalog=query_ids is None)
        assert parts.recall == whole.recall and parts.num_queries == whole.num_queries
        assert parts.query_items_excluded == (query_ids is not None)
    assert whole.recall < 1.0 or len(queries) == 1  # a figure that can be wrong


def test_seen_items_are_left_out_of_both_answers_and_the_shares_still_combine(small_catalog):
    """Queries searched without a set of items each (a user's seen items, as serving searches): the exact
    answer leaves them out too, so an exact index scores 1.0 even when every one of a query's best items is
    excluded, an index that returned them would not, and the shards' shares give the whole figure."""
    ids, vectors = small_catalog
    queries = unit_rows(np.random.default_rng(21), 60, vectors.shape[1])
    top, _ = exact_search(queries, vectors, 10)
    seen = [{ids[r] for r in row[:j % 11]} for j, row in enumerate(top)]  # 0-10 of each query's exact top 10
    exact = ShardedIndex.from_arrays(ids, vectors, IndexConfig(), num_shards=3)
    check = measure_recall(exact, queries, ids, vectors, k=10, exclude=seen)
    assert check.recall == 1.0 and check.seen_items_excluded and not check.query_items_excluded
    assert _by_shard(exact, ids, vectors, queries, 10, exclude=seen).recall == 1.0
    # the answers without the exclusions, scored against the truth with them: the excluded items are misses
    found, _ = exact.search(queries, 10)
    truth, _ = exact_search(queries, vectors, 10, [[ids.index(i) for i in ex] for ex in seen])
    assert recall_at_k(found, [[ids[r] for r in row] for row in truth]) < 0.7
    ah = ShardedIndex.from_arrays(ids, vectors, IndexConfig(mode="ah", num_neighbors=2, reorder_num_neighbors=2,
                                                            training_threads=1), num_shards=3)
    whole = measure_recall(ah, queries, ids, vectors, k=10, exclude=seen)
    assert whole.recall < 1.0  # a figure that can be wrong
    assert _by_shard(ah, ids, vectors, queries, 10, exclude=seen).recall == whole.recall
    item_ids = ids[:60]  # with the query items excluded as well
    both = measure_recall(ah, vectors[:60], ids, vectors, k=10, query_ids=item_ids, exclude=seen)
    shares = _by_shard(ah, ids, vectors, vectors[:60], 10, item_ids, ordered_as_catalog=False, exclude=seen)
    assert shares.recall == both.recall and both.query_items_excluded and both.seen_items_excluded
    with pytest.raises(ValueError, match="59 exclusion sets for 60 queries"):
        measure_recall(ah, queries, ids, vectors, k=10, exclude=seen[1:])
    with pytest.raises(TypeError, match="a set of item ids per query, not 'small-0001'"):
        shard_recall(ah.shards[0], vectors[[ids.index(i) for i in ah.shards[0].id_list]], queries[:1], 10,
                     ids=ah.shards[0].id_list, exclude=["small-0001"])


def test_shares_with_ties_across_shards_and_shards_smaller_than_k(duplicated):
    """Copies of one vector sit in different shards (ties broken by the merge), k is above each shard's
    size, and a one-item shard holds only the excluded query item: the same figures as the whole index."""
    ids, vectors, index = duplicated
    users = unit_rows(np.random.default_rng(4), 40, 16)
    assert _by_shard(index, ids, vectors, users, 10).recall == measure_recall(index, users, ids, vectors, 10).recall
    assert _by_shard(index, ids, vectors, vectors[::3], 10, ids[::3]).recall == 1.0
    small_ids, small_vectors = ids[:9], vectors[:9]
    tiny = ShardedIndex.from_arrays(small_ids, small_vectors, IndexConfig(), num_shards=3)
    got = _by_shard(tiny, small_ids, small_vectors, small_vectors, 6, small_ids)  # k=6 > 3 items a shard
    assert got.recall == measure_recall(tiny, small_vectors, small_ids, small_vectors, 6, small_ids).recall
    one = ShardedIndex.from_arrays(["a", "b"], np.eye(2, 16, dtype=np.float32), IndexConfig(), num_shards=2)
    alone = _by_shard(one, ["a", "b"], np.eye(2, 16, dtype=np.float32), np.eye(1, 16, dtype=np.float32), 1, ["a"])
    assert alone.recall == 1.0 and alone.num_queries == 1  # "b" is the only other item, and is found


def test_a_share_refuses_vectors_that_are_not_the_shards(small_catalog):
    ids, vectors = small_catalog
    index = ShardedIndex.from_arrays(ids[:100], vectors[:100], IndexConfig(), num_shards=1)
    with pytest.raises(ValueError, match="not its 100 items"):
        shard_recall(index.shards[0], vectors[:99], vectors[:5], 10)
    with pytest.raises(ValueError, match="not its 100 items"):
        shard_recall(index.shards[0], vectors[1:101], vectors[:5], 10, ids=ids[1:101])
    with pytest.raises(ValueError, match="over different queries"):
        combine_recall([shard_recall(index.shards[0], vectors[:100], vectors[:5], 10),
                        shard_recall(index.shards[0], vectors[:100], vectors[:4], 10)], 10)
