"""Sharded search: recall against exact search, merge correctness, exclusion, small catalogs."""

import numpy as np
import pytest

from tessera.index import (
    IndexConfig,
    SearchConfig,
    ShardArtifact,
    ShardedIndex,
    build_shard,
    exact_search,
    measure_recall,
    recall_at_k,
)


def _exact_ids(ids, vectors, queries, k, exclude=None):
    rows_excl = None
    if exclude is not None:
        pos = {item: i for i, item in enumerate(ids)}
        rows_excl = [[pos[e] for e in ex if e in pos] for ex in exclude]
    rows, scores = exact_search(queries, vectors, k, rows_excl)
    return [[ids[r] for r in row if r >= 0] for row in rows], scores


def test_ah_shards_recall_at_10(ah_index, catalog, queries):
    ids, vectors = catalog
    found, scores = ah_index.search(queries, k=10)
    truth, truth_scores = _exact_ids(ids, vectors, queries, 10)
    assert recall_at_k(found, truth) >= 0.95
    assert all(len(row) == 10 for row in found)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    np.testing.assert_allclose(scores[:, 0], truth_scores[:, 0], atol=1e-5)  # reordered scores are exact


def test_sharding_does_not_cost_recall(ah_index, catalog, queries, ah_config):
    ids, vectors = catalog
    single = ShardedIndex.from_arrays(ids, vectors, ah_config, num_shards=1)
    assert single.shards[0].params.mode == "ah"
    sharded = measure_recall(ah_index, queries, ids, vectors, k=10).recall
    unsharded = measure_recall(single, queries, ids, vectors, k=10).recall
    assert unsharded >= 0.95
    # Merging three per-shard top-10s only adds candidates, so sharding may help but must not hurt.
    assert sharded >= unsharded - 0.01


def test_merge_of_exact_shards_equals_exact_search(exact_index, small_catalog):
    ids, vectors = small_catalog
    q = vectors[:50] + 0.3 * np.random.default_rng(1).standard_normal((50, vectors.shape[1])).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    found, scores = exact_index.search(q, k=25)
    truth, truth_scores = _exact_ids(ids, vectors, q, 25)
    assert found == truth
    np.testing.assert_allclose(scores, truth_scores, rtol=0, atol=1e-6)
    exclude = [set(row[::3]) | {"not-in-catalog"} for row in truth]
    found_ex, _ = exact_index.search(q, k=25, exclude=exclude)
    assert found_ex == _exact_ids(ids, vectors, q, 25, exclude)[0]


@pytest.mark.parametrize("index_name", ["ah_index", "exact_index"])
def test_exclusion_still_returns_k(index_name, request, queries):
    index = request.getfixturevalue(index_name)
    q = np.random.default_rng(2).standard_normal((40, index.dim)).astype(np.float32)
    top, _ = index.search(q, k=60)
    # Exclude each query's best 50 (beyond any one call's headroom), plus one query excluding nothing.
    exclude = [set(row[:50]) for row in top[:-1]] + [set()]
    found, scores = index.search(q, k=10, exclude=exclude)
    for row, ex, before in zip(found, exclude, top, strict=True):
        assert len(row) == 10 and not set(row) & ex
        if ex and index_name == "exact_index":
            assert row == before[50:60]  # the next best ones come up
        elif ex:
            assert len(set(row[:5]) & set(before[50:55])) >= 4
    assert found[-1] == top[-1][:10]
    assert np.isfinite(scores).all()


def test_searches_during_and_after_close_still_answer(ah_index, queries):
    """close() (a version evicted by serving) while other threads search: their searches answer, one shard
    after another, where one that had the pool just before raised "cannot schedule new futures after
    shutdown"; a search after close does not start a pool nobody closes."""
    import threading

    serial = ah_index.search(queries, k=10)
    index = ShardedIndex(ah_index.shards, SearchConfig(search_threads=3))
    errors, answers = [], []
    searching = threading.Barrier(4)  # the three searchers are under way (each has searched) before close()

    def search_a_while():
        try:
            answers.append(index.search(queries, k=10)[0])
            searching.wait(timeout=30)
            for _ in range(30):
                answers.append(index.search(queries, k=10)[0])
        except Exception as err:  # noqa: BLE001 - any failure is the finding
            errors.append(err)

    threads = [threading.Thread(target=search_a_while) for _ in range(3)]
    for t in threads:
        t.start()
    searching.wait(timeout=30)
    index.close()
    for t in threads:
        t.join()
    assert not errors and answers and all(a == serial[0] for a in answers)
    assert index.search(queries, k=10)[0] == serial[0] and index._pool is None


def test_fewer_items_than_k(small_catalog):
    ids, vectors = small_catalog
    index = ShardedIndex.from_arrays(ids[:5], vectors[:5], num_shards=2)
    found, scores = index.search(vectors[:2], k=8, exclude=[{ids[0]}, set()])
    assert [len(r) for r in found] == [4, 5] and found[1][0] == ids[1]
    assert np.isneginf(scores[0, 4:]).all() and np.isfinite(scores[1, :5]).all()


def test_parallel_shard_search_equals_serial(ah_index, queries):
    serial = ah_index.search(queries, k=10)
    with ShardedIndex(ah_index.shards, SearchConfig(search_threads=3)) as threaded:
        parallel = threaded.search(queries, k=10)
    assert parallel[0] == serial[0] and np.array_equal(parallel[1], serial[1])


def test_query_validation(exact_index):
    with pytest.raises(ValueError, match="dimension 5"):
        exact_index.search(np.ones((2, 5), np.float32), k=3)
    with pytest.raises(ValueError, match="zero norm"):
        exact_index.search(np.zeros((1, exact_index.dim), np.float32), k=3)
    with pytest.raises(ValueError, match=r"one collection of item ids per query \(2\), got 1 entries"):
        exact_index.search(np.ones((2, exact_index.dim), np.float32), k=3, exclude=[set()])
    ids, scores = exact_index.search(np.empty((0, exact_index.dim), np.float32), k=3)
    assert ids == [] and scores.shape == (0, 3)


@pytest.mark.parametrize("num_queries", [1, 2])  # the lone-query path and the batched one
def test_exclusions_are_matched_as_strings_and_a_bare_string_is_refused(num_queries):
    """Ids are held as strings: an int id excluded as an int was returned anyway; a lone string where a set
    belongs was iterated as its characters (nothing excluded), and None crashed the batched path."""
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(40, 8)).astype(np.float32)
    index = ShardedIndex.from_arrays(list(range(40)), vectors, IndexConfig(), num_shards=2)
    q = np.repeat(vectors[:1], num_queries, axis=0)
    [top, *_], _ = index.search(q, k=3)
    assert top[0] == "0"
    [got, *_], _ = index.search(q, k=3, exclude=[{0, 1}] * num_queries)
    assert "0" not in got and "1" not in got and len(got) == 3
    for bad in ("0", [None] * num_queries, ["0"] * num_queries):
        with pytest.raises(ValueError, match="exclude"):
            index.search(q, k=3, exclude=bad)
    # a set of strings and ints: every id matched, whichever the set yields first (only the first one's type
    # was checked, so an int after a string stayed an int and was returned, as the hash seed decided)
    c = next(c for c in range(40) if type(next(iter({"y0", c}))) is str)  # a set that yields the string first
    qc = np.repeat(vectors[c:c + 1], num_queries, axis=0)
    assert index.search(qc, k=1)[0][0] == [str(c)]
    [got, *_], _ = index.search(qc, k=3, exclude=[{"y0", c}] * num_queries)
    assert str(c) not in got and len(got) == 3


def test_shards_must_be_numbered_and_disjoint(exact_index):
    first = exact_index.shards[0]
    with pytest.raises(ValueError, match="shard ids"):
        ShardedIndex([first, first])
    twin = ShardArtifact(shard_id=1, ids=first.ids, params=first.params, vectors=first.vectors)
    with pytest.raises(ValueError, match=f"unique across shards: '{first.id_list[0]}' is in shard 0 and shard 1"):
        ShardedIndex([first, twin])
    wider = build_shard(["other"], np.ones((1, first.dim + 1), np.float32), IndexConfig(), shard_id=1)
    with pytest.raises(ValueError, match=f"shard 0: {first.dim}-d, normalised, shard 1: {first.dim + 1}-d"):
        ShardedIndex([first, wider])


def test_a_bad_row_is_named_by_its_shard_and_item_not_its_row_within_the_shard():
    """Rows are split by id hash before each shard is built: "row 30" was the row within a shard, which the
    caller's own row 90 is not."""
    vectors = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    vectors[90] = 0.0
    with pytest.raises(ValueError, match=r"shard \d: item vectors row \d+ has zero norm .*\(item 'item-90'\)"):
        ShardedIndex.from_arrays([f"item-{i}" for i in range(100)], vectors, IndexConfig(), num_shards=3)
    vectors[90] = np.inf  # checked before the split: the caller's row
    with pytest.raises(ValueError, match=r"^item vectors row 90 has non-finite"):
        ShardedIndex.from_arrays([f"item-{i}" for i in range(100)], vectors, IndexConfig(), num_shards=3)
    vectors[90] = 1.0
    with pytest.raises(ValueError, match="unique: 'item-7' appears more than once"):
        ShardedIndex.from_arrays([f"item-{i}" for i in range(99)] + ["item-7"], vectors, IndexConfig(), num_shards=3)


def test_one_query_at_a_time_gets_the_batch_answer_ties_included(small_catalog):
    """Up to a handful of queries merge in plain Python, more in numpy: the same ids, order and scores,
    ties broken the same way (equal scores: the lower shard first, then that shard's own order)."""
    ids, vectors = small_catalog
    twins = [f"{i}-twin" for i in ids]  # every vector twice, under two ids that hash to different shards
    index = ShardedIndex.from_arrays(ids + twins, np.concatenate([vectors, vectors]), num_shards=3)
    assert all(s.params.mode == "brute_force" for s in index.shards)
    q = vectors[:12] + 0.2 * np.random.default_rng(3).standard_normal((12, vectors.shape[1])).astype(np.float32)
    batch_ids, batch_scores = index.search(q, k=9)  # 12 queries: the numpy merge
    assert any(s[0] == s[1] for s in batch_scores)  # the twins tie
    for i in range(len(q)):
        one_ids, one_scores = index.search(q[i:i + 1], k=9)
        assert one_ids == [batch_ids[i]]
        np.testing.assert_allclose(one_scores, batch_scores[i:i + 1], rtol=0, atol=1e-6)  # BLAS: 1 ulp
    few_ids, few_scores = index.search(q[:5], k=9)
    assert few_ids == batch_ids[:5]
    np.testing.assert_allclose(few_scores, batch_scores[:5], rtol=0, atol=1e-6)
    # fewer eligible items than k: the same -inf padding on both paths
    small = ShardedIndex.from_arrays(ids[:6], vectors[:6], num_shards=2)
    alone, alone_scores = small.search(q[:1], k=8)
    many, many_scores = small.search(q, k=8)
    assert alone == many[:1] and len(alone[0]) == 6
    np.testing.assert_allclose(alone_scores, many_scores[:1], rtol=0, atol=1e-6)
    assert np.isneginf(alone_scores[0, 6:]).all()


def test_scann_shards_answer_one_query_like_a_batch(ah_index, queries):
    """The per-query path (one ScaNN call a shard, no padding to drop) returns what a batched call does."""
    batch_ids, batch_scores = ah_index.search(queries[:20], k=10)
    for i in range(20):
        one_ids, one_scores = ah_index.search(queries[i:i + 1], k=10)
        assert one_ids == [batch_ids[i]]
        np.testing.assert_allclose(one_scores, batch_scores[i:i + 1], rtol=0, atol=1e-6)
