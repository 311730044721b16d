"""Many threads searching one index at once get exactly the serial results (no lock is needed)."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tessera.index import SearchConfig, ShardedIndex


@pytest.mark.parametrize("search_threads", [1, 3])
def test_eight_threads_equal_serial(ah_index, queries, search_threads):
    index = ShardedIndex(ah_index.shards, SearchConfig(search_threads=search_threads))
    rng = np.random.default_rng(0)
    calls = []
    for _ in range(48):
        rows = rng.choice(len(queries), size=int(rng.integers(1, 40)), replace=False)
        k = int(rng.integers(1, 30))
        exclude = [{f"item-{int(i):05d}" for i in rng.integers(0, 30_000, size=int(rng.integers(0, 20)))}
                   for _ in rows]
        calls.append((queries[rows], k, exclude))
    serial = [index.search(q, k, ex) for q, k, ex in calls]

    def run(i):
        q, k, ex = calls[i % len(calls)]
        return i % len(calls), index.search(q, k, ex)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, range(8 * len(calls))))
    index.close()
    for i, (ids, scores) in results:
        assert ids == serial[i][0]
        assert np.array_equal(scores, serial[i][1])


def test_lone_queries_from_eight_threads_equal_serial(ah_index, queries):
    """The one-query path (ScaNN's single-query call per shard, merged in Python) under 8 threads."""
    serial = [ah_index.search(queries[i:i + 1], 1 + i % 25) for i in range(len(queries))]

    def run(i):
        j = i % len(queries)
        return j, ah_index.search(queries[j:j + 1], 1 + j % 25)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, range(4 * len(queries))))
    for j, (ids, scores) in results:
        assert ids == serial[j][0]
        assert np.array_equal(scores, serial[j][1])
