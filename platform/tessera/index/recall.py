"""Recall@k of a sharded index against exact search: whole (:func:`measure_recall`), or a shard at a time
(:func:`shard_recall` where each shard's vectors are, then :func:`combine_recall`).

A query's recall is the share of its exact top-``k`` the index found, where a returned item counts as
found when its exact score is at least the exact ``k``-th score less a tolerance (times that score's
magnitude when above 1): among items tied at the cut-off, exact search keeps some by row order, and
another of them is as good an answer. Queries that are vectors of catalog items (``query_ids``) are
searched with that item excluded, in the exact answer and in the index's: the item itself, its own
nearest neighbour, would otherwise be a free hit (1/k of the figure), as the shard tuning's
leave-one-out queries already avoid. Queries may also leave out further items (``exclude``: a user's
history, as serving's ``exclude_seen`` leaves it out), again from both answers: the index then has to
find the best items past the excluded ones, as it does in serving.

Both ways give the same figure. The exact top-``k`` over the catalog is the top-``k`` of the shards'
exact top-``k`` lists, and the index's answer is the merge of its shards' answers
(:func:`tessera.index.sharded.merge_candidates`), so a shard's share needs only that shard and its own
vectors: the index job measures each shard inside the task that built it, where its vectors already
are, and no process ever holds a whole index column.

Example::

    check = measure_recall(index, vecs[:500], ids, vecs, k=10, query_ids=ids[:500])
    parts = [shard_recall(shard, vecs[rows[s]], vecs[:500], k=10, query_ids=ids[:500], ids=[ids[r] for r in rows[s]])
             for s, shard in enumerate(index.shards)]  # rows[s]: shard s's rows of vecs
    same = combine_recall(parts, k=10, query_items_excluded=True)  # check.recall == same.recall
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tessera.index.exact import as_float_matrix, exact_search, l2_normalize, prepare_queries
from tessera.index.manifest import RecallCheck
from tessera.index.shard import ShardArtifact, search_shard
from tessera.index.sharded import ShardedIndex, merge_candidates

# A returned item within this of the exact k-th score is a hit (ties at the cut-off; float32 rounding of
# the same dot product in two matrix products differs by far less).
RECALL_TIE_TOLERANCE = 1e-5


def query_recall(found_scores: np.ndarray, truth: np.ndarray, tie_tolerance: float) -> float | None:
    """One query's recall: ``found_scores`` are the exact scores of the items the index returned (the
    query's own item left out), ``truth`` the exact top-``k`` scores, best first, finite only (fewer than
    ``k`` when fewer items are eligible). None when no item is eligible (the query does not count)."""
    if not len(truth):
        return None
    kth = float(truth[-1])
    hits = int(np.count_nonzero(found_scores >= kth - tie_tolerance * max(1.0, abs(kth))))
    return min(hits, len(truth)) / len(truth)


def measure_recall(index: ShardedIndex, queries, item_ids: Sequence[str], item_vectors, k: int = 10,
                   query_ids: Sequence[str | None] | None = None,
                   tie_tolerance: float = RECALL_TIE_TOLERANCE,
                   exclude: Sequence[set[str]] | None = None) -> RecallCheck:
    """Recall@k of ``index`` against exact search over the full catalog, in one process (see the
    module docstring for what counts as found).

    Args:
        index: the index to check.
        queries: (Q, D) query vectors (e.g. a sample of item vectors or held-out user vectors).
        item_ids, item_vectors: the whole catalog the index was built from.
        k: cut-off.
        query_ids: per query, the catalog item it is the vector of (None: not an item); None for
            queries that are no item's (user vectors).
        tie_tolerance: see above; :data:`RECALL_TIE_TOLERANCE` covers float32 rounding only.
        exclude: per query, a set of item ids left out of both answers (recorded as
            ``seen_items_excluded``: a user's seen items); None: nothing more than ``query_ids``.

    Example::

        check = measure_recall(index, vecs[:500], ids, vecs, k=10, query_ids=ids[:500])
        assert check.recall >= 0.95
    """
    x = as_float_matrix(item_vectors, "item vectors", index.dim)
    q = as_float_matrix(queries, "queries", index.dim)
    if x.shape[0] != len(item_ids):
        raise ValueError(f"{len(item_ids)} item ids for {x.shape[0]} item vectors")
    _check_query_ids(query_ids, q)
    if index.shards[0].params.normalized:
        x, q = l2_normalize(x), l2_normalize(q, "queries")
    row_of = {str(item): r for r, item in enumerate(item_ids)}
    seen_excluded = exclude is not None
    exclude = _exclusions(query_ids, exclude, q.shape[0])
    exclude_rows = None if exclude is None else [[row_of[i] for i in ex if i in row_of] for ex in exclude]
    start = time.perf_counter()
    approx, _ = index.search(q, k, exclude)
    seconds = time.perf_counter() - start
    _, exact_scores = exact_search(q, x, k, exclude_rows)  # (Q, min(k, N)), -inf past the eligible items
    recalls = []
    for i, found in enumerate(approx):
        skip = exclude[i] if exclude is not None else ()
        rows = [row_of[item] for item in dict.fromkeys(found[:k]) if item in row_of and item not in skip]
        recalls.append(query_recall(x[rows] @ q[i], exact_scores[i][np.isfinite(exact_scores[i])], tie_tolerance))
    return _recall_check(recalls, k, seconds, tie_tolerance, query_ids is not None, seen_excluded)


@dataclass
class ShardRecall:
    """One shard's share of a recall check (:func:`shard_recall`): small, whatever the shard's size.

    Attributes:
        found: per query, the shard's answer best first as ``(item id, exact score)``.
        found_scores: per query, the scores the shard's search ranked them by (what the index's merge
            orders by: approximate for a shard searched without reordering).
        exact: (Q, k) the shard's exact top-``k`` scores, best first, ``-inf`` padded.
        search_seconds: the shard's search of every query.
    """

    found: list[list[tuple[str, float]]]
    found_scores: list[list[float]]
    exact: np.ndarray
    search_seconds: float


def shard_recall(shard: ShardArtifact, vectors, queries, k: int = 10,
                 query_ids: Sequence[str | None] | None = None, ids: Sequence[str] | None = None,
                 exclude: Sequence[set[str]] | None = None) -> ShardRecall:
    """Search ``queries`` in one shard (as :meth:`ShardedIndex.search` searches each of its shards) and
    score its answers and its exact top-``k`` against the shard's own ``vectors``.

    Args:
        shard: the shard as loaded (its saved search settings apply).
        vectors: (n, D) the shard's item vectors, row ``r`` the vector of ``ids[r]``.
        queries: (Q, D) query vectors (normalised here when the shard is).
        k: cut-off.
        query_ids: per query, the catalog item it is the vector of (None: not an item), left out of
            both answers where this shard holds it.
        ids: the items of ``vectors`` (None: the shard's own order, ``shard.ids``).
        exclude: per query, further item ids left out of both answers where this shard holds them.
    """
    x = as_float_matrix(vectors, "item vectors", shard.dim)
    q = as_float_matrix(queries, "queries", shard.dim)
    _check_query_ids(query_ids, q)
    ids = shard.id_list if ids is None else [str(i) for i in ids]
    if x.shape[0] != len(ids) or set(ids) != set(shard.row_of):
        raise ValueError(f"shard {shard.shard_id}: the vectors given are not its {shard.count} items")
    if shard.params.normalized:
        x, q = l2_normalize(x), l2_normalize(q, "queries")
    row_of = {item: r for r, item in enumerate(ids)}
    exclude = _exclusions(query_ids, exclude, q.shape[0])
    searched = prepare_queries(q, shard.dim, shard.params.normalized)  # as ShardedIndex.search prepares them
    start = time.perf_counter()
    rows, scores = search_shard(shard, searched, k,
                                None if exclude is None else [shard.rows_of(ex) for ex in exclude])
    seconds = time.perf_counter() - start
    exact = np.full((q.shape[0], k), -np.inf, np.float32)
    if len(ids):
        _, top = exact_search(q, x, k, None if exclude is None else [[row_of[i] for i in ex if i in row_of]
                                                                      for ex in exclude])
        exact[:, :top.shape[1]] = top
    found, found_scores = [], []
    for i, (row, score) in enumerate(zip(rows.tolist(), scores.tolist(), strict=True)):
        items = [shard.id_list[r] for r in row if r >= 0]
        mine = [row_of[item] for item in items]
        found.append(list(zip(items, (x[mine] @ q[i]).tolist(), strict=True)))
        found_scores.append(score[:len(items)])
    return ShardRecall(found, found_scores, exact, seconds)


def combine_recall(parts: Sequence[ShardRecall], k: int = 10, tie_tolerance: float = RECALL_TIE_TOLERANCE,
                   query_items_excluded: bool = False, seen_items_excluded: bool = False) -> RecallCheck:
    """The index's recall from every shard's :class:`ShardRecall` (in shard order): the shards' answers
    merged as the index merges them, against the top-``k`` of their exact lists.

    Args:
        parts: one per shard of the index, shard 0 first, over the same queries.
        k: the cut-off they were measured at.
        tie_tolerance: see :func:`measure_recall`.
        query_items_excluded: the queries were item vectors searched without their item (recorded).
        seen_items_excluded: the queries were searched without their users' seen items (recorded).
    """
    if not parts:
        raise ValueError("no shard to combine")
    num_queries = len(parts[0].found)
    if any(len(p.found) != num_queries for p in parts):
        raise ValueError("the shards' checks are over different queries")
    exact = np.concatenate([p.exact for p in parts], axis=1)  # (Q, S*k)
    recalls = []
    for i in range(num_queries):
        merged, _ = merge_candidates([(list(range(len(p.found[i]))), p.found_scores[i]) for p in parts], k,
                                     [p.found[i] for p in parts])
        truth = np.sort(exact[i][np.isfinite(exact[i])])[::-1][:k]
        recalls.append(query_recall(np.array([score for _, score in merged], np.float32), truth, tie_tolerance))
    return _recall_check(recalls, k, sum(p.search_seconds for p in parts), tie_tolerance, query_items_excluded,
                         seen_items_excluded)


def _check_query_ids(query_ids: Sequence[str | None] | None, q: np.ndarray) -> None:
    if query_ids is not None and len(query_ids) != q.shape[0]:
        raise ValueError(f"{len(query_ids)} query ids for {q.shape[0]} queries")


def _exclusions(query_ids: Sequence[str | None] | None, exclude: Sequence[set[str]] | None,
                num_queries: int) -> list[set[str]] | None:
    """Per query, the item ids left out of both answers: its own item (``query_ids``) and ``exclude``'s set."""
    if exclude is not None:
        if len(exclude) != num_queries:
            raise ValueError(f"{len(exclude)} exclusion sets for {num_queries} queries")
        bad = next((ex for ex in exclude if isinstance(ex, (str, bytes)) or ex is None), False)
        if bad is not False:
            raise TypeError(f"an exclusion is a set of item ids per query, not {bad!r}")
    if query_ids is None and exclude is None:
        return None
    out = [set() if query_ids is None or query_ids[i] is None else {str(query_ids[i])} for i in range(num_queries)]
    for i, ex in enumerate(exclude or ()):
        out[i].update(str(item) for item in ex)
    return out


def _recall_check(recalls: list[float | None], k: int, seconds: float, tie_tolerance: float,
                  query_items_excluded: bool, seen_items_excluded: bool = False) -> RecallCheck:
    counted = [r for r in recalls if r is not None]
    return RecallCheck(k=k, num_queries=len(recalls), recall=sum(counted) / len(counted) if counted else 1.0,
                       search_seconds=seconds, tie_tolerance=tie_tolerance, query_items_excluded=query_items_excluded,
                       seen_items_excluded=seen_items_excluded)
