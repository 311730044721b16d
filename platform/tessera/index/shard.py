"""One index shard: build it (ScaNN, or exact vectors for small shards), tune it, search it.

:func:`build_shard` is the unit of work a Ray task runs (no Ray here): it normalises the vectors,
picks the algorithm from the shard's size (:func:`tessera.index.params.derive_params`), builds the
ScaNN searcher, and tunes the reordering depth and ``num_leaves_to_search`` for the recall target on
leave-one-out queries (shard vectors searched with themselves excluded) and, when given, on real
queries of another kind (the index job passes user-tower vectors: they sit far flatter over the
items than an item's own vector does, and need a much deeper reordering for the same recall),
recording the final recall (the lowest over the query sets).

Thread safety: :func:`search_shard` and :func:`search_shard_one` only read the shard. ScaNN's
``search_batched`` (non-parallel mode) and one-query ``search`` are const searches in C++ (the
batched one releases the GIL while it runs); 8 threads hammering one searcher return bit-identical
results to serial calls, through either (``tests/index/test_concurrency.py``), so no lock is
taken. ``search_batched_parallel`` and ``set_num_threads`` mutate the searcher's thread pool and
are not used.

Example::

    shard = build_shard(ids, vectors, IndexConfig(), shard_id=0)
    rows, scores = search_shard(shard, queries, k=10)
    best_ids = shard.ids[rows[0]]
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from tessera.index.exact import as_float_matrix, exact_search, l2_normalize, recall_at_k
from tessera.index.params import IndexConfig, ScannParams, derive_params


@dataclass
class ShardArtifact:
    """A built or loaded shard, searchable in memory.

    Attributes:
        shard_id: position of the shard in its index (names the ``shard-NNNN`` folder).
        ids: (N,) object array of item ids; row ``i`` of the searcher is ``ids[i]``.
        params: the parameters it was built and is searched with.
        searcher: the ScaNN searcher (None for brute-force shards).
        vectors: (N, D) float32 normalised vectors (brute-force shards only, else None).
        build_seconds: wall time of build + tuning.
        self_recall: recall@num_neighbors measured after tuning (1.0 when exact): the lowest of the
            leave-one-out item queries and the extra tuning queries, if any.
    """

    shard_id: int
    ids: np.ndarray
    params: ScannParams
    searcher: Any | None = None
    vectors: np.ndarray | None = None
    build_seconds: float = 0.0
    self_recall: float | None = None
    row_of: dict[str, int] = field(init=False, repr=False)
    id_list: list[str] = field(init=False, repr=False)  # ``ids`` as a list: a row's id without a numpy lookup

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=object)
        self.id_list = self.ids.tolist()
        self.row_of = {item_id: row for row, item_id in enumerate(self.ids)}
        if len(self.row_of) != len(self.ids):
            from tessera.index.sharding import first_duplicate

            raise ValueError(f"shard {self.shard_id}: item ids must be unique: {first_duplicate(self.id_list)!r} "
                             "appears more than once")
        if (self.searcher is None) == (self.vectors is None):
            raise ValueError(f"shard {self.shard_id}: needs exactly one of a ScaNN searcher or exact vectors")

    @property
    def count(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.params.dim

    def rows_of(self, item_ids: Iterable[str]) -> np.ndarray:
        """Rows of the given ids that live in this shard (others are ignored)."""
        rows = [self.row_of[i] for i in item_ids if i in self.row_of]
        return np.asarray(rows, dtype=np.int64)


def build_shard(ids: Sequence[str], vectors, config: IndexConfig | None = None, shard_id: int = 0,
                catalog_size: int | None = None, tuning_queries=None) -> ShardArtifact:
    """Build one shard from its ids and vectors.

    Args:
        ids: N unique item ids.
        vectors: (N, D) array-like of item vectors (normalised here when ``config.normalize``).
        config: build settings; defaults follow ScaNN's guidance.
        shard_id: the shard's position in its index.
        catalog_size: items in the whole index, when this is one shard of several.
        tuning_queries: (Q, D) array-like of real queries the tuning must also bring to the recall
            target (against exact search over this shard), besides the shard's own vectors.

    Returns:
        A searchable :class:`ShardArtifact` with tuned params and its self-check recall.

    Example::

        shard = build_shard([f"item-{i}" for i in range(n)], vecs, IndexConfig(), shard_id=2)
    """
    config = config or IndexConfig()
    start = time.perf_counter()
    ids = [str(i) for i in ids]
    try:  # a bad row is named by its item too (its row is this shard's own)
        x = as_float_matrix(vectors, "item vectors", ids=ids)
        if x.shape[0] != len(ids):
            raise ValueError(f"{len(ids)} ids for {x.shape[0]} vectors")
        if x.shape[0] == 0:
            raise ValueError("no item")
        if config.normalize:
            x = l2_normalize(x, "item vectors", ids)
    except ValueError as err:
        raise ValueError(f"shard {shard_id}: {err}") from None
    extra = None
    if tuning_queries is not None and len(tuning_queries):
        extra = as_float_matrix(tuning_queries, "tuning queries")
        if extra.shape[1] != x.shape[1]:
            raise ValueError(f"shard {shard_id}: tuning queries have dimension {extra.shape[1]}, items {x.shape[1]}")
        if config.normalize:
            extra = l2_normalize(extra, "tuning queries")
    params = derive_params(x.shape[0], x.shape[1], config, catalog_size)
    if params.mode == "brute_force":
        shard = ShardArtifact(shard_id, np.asarray(ids, dtype=object), params, vectors=x, self_recall=1.0)
    else:
        searcher = _build_searcher(x, params, config.training_threads)
        shard = ShardArtifact(shard_id, np.asarray(ids, dtype=object), params, searcher=searcher)
        shard.params, shard.self_recall = _tune(shard, x, config, extra)
    shard.build_seconds = time.perf_counter() - start
    return shard


def _build_searcher(x: np.ndarray, params: ScannParams, training_threads: int):
    from scann.scann_ops.py import scann_ops_pybind

    builder = scann_ops_pybind.builder(x, params.num_neighbors, "dot_product")
    if params.mode == "tree_ah":
        builder = builder.tree(num_leaves=params.num_leaves, num_leaves_to_search=params.num_leaves_to_search,
                               training_sample_size=params.training_sample_size, spherical=bool(params.spherical),
                               soar_lambda=params.soar_lambda, overretrieve_factor=params.soar_overretrieve_factor)
    builder = builder.score_ah(params.dimensions_per_block,
                               anisotropic_quantization_threshold=params.anisotropic_quantization_threshold,
                               training_sample_size=params.training_sample_size, hash_type=params.hash_type)
    builder = builder.reorder(params.reorder_num_neighbors)
    return builder.set_n_training_threads(training_threads).build()


def _tune(shard: ShardArtifact, x: np.ndarray, config: IndexConfig,
          extra: np.ndarray | None = None) -> tuple[ScannParams, float]:
    """Raise reordering depth, then leaves searched, until every query set meets the recall target.

    The query sets: a sample of the shard's own vectors searched with themselves excluded, and
    ``extra`` (already normalised) when given. The recall of a setting is the lowest over the sets.
    """
    params, n = shard.params, shard.count
    k = min(params.num_neighbors, n - 1)
    if k < 1:
        return params, 1.0
    rng = np.random.default_rng(config.seed + shard.shard_id)
    sample = np.sort(rng.choice(n, size=min(config.tuning_queries, n), replace=False))
    self_rows = [np.asarray([s]) for s in sample]
    query_sets = [(x[sample], self_rows, exact_search(x[sample], x, k, exclude_rows=self_rows)[0])]
    if extra is not None:
        query_sets.append((extra, None, exact_search(extra, x, k)[0]))

    def recall(p: ScannParams) -> float:
        return min(recall_at_k(_scann_search(shard.searcher, p, n, q, k, excl)[0].tolist(), truth.tolist())
                   for q, excl, truth in query_sets)

    target = config.recall_target
    if config.reorder_num_neighbors is None:
        # Rescoring alone must clear the target with margin, or no number of leaves can reach it.
        probe = params.model_copy(update={"num_leaves_to_search": params.num_leaves})
        goal = target + (1 - target) / 2 if params.mode == "tree_ah" else target
        while recall(probe) < goal and probe.reorder_num_neighbors < n:
            probe = probe.model_copy(update={"reorder_num_neighbors": min(n, 2 * probe.reorder_num_neighbors)})
        params = params.model_copy(update={"reorder_num_neighbors": probe.reorder_num_neighbors})
    if params.mode == "tree_ah" and config.num_leaves_to_search is None:
        # Fine steps (x1.25): every leaf searched costs every query, so overshooting the target is slow.
        while recall(params) < target and params.num_leaves_to_search < params.num_leaves:
            grown = min(params.num_leaves, max(params.num_leaves_to_search + 1,
                                               math.ceil(1.25 * params.num_leaves_to_search)))
            params = params.model_copy(update={"num_leaves_to_search": grown})
    return params, recall(params)


def search_shard(shard: ShardArtifact, queries: np.ndarray, k: int,
                 exclude_rows: Sequence[np.ndarray] | None = None,
                 params: ScannParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of one shard for each query, never returning an excluded row.

    Args:
        shard: the shard.
        queries: (Q, D) float32, already normalised as the index expects.
        k: neighbours per query.
        exclude_rows: per query, shard rows to leave out; the search asks ScaNN for that many more
            neighbours so that ``k`` are still returned when the shard has enough items.
        params: search-time overrides of ``shard.params`` (leaves to search, reordering depth).

    Returns:
        ``(rows int64 (Q, k), scores float32 (Q, k))`` best first, padded with row ``-1`` and
        score ``-inf`` where the shard has fewer than ``k`` eligible items.

    Example::

        rows, scores = search_shard(shard, q, 10, exclude_rows=[shard.rows_of({"item-7"})] * len(q))
        best = shard.ids[rows[0][rows[0] >= 0]]
    """
    if shard.vectors is not None:
        rows, scores = exact_search(queries, shard.vectors, k, exclude_rows)
    else:
        rows, scores = _scann_search(shard.searcher, params or shard.params, shard.count, queries, k, exclude_rows)
    if rows.shape[1] < k:  # the shard holds fewer than k items
        pad = k - rows.shape[1]
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return rows, scores


def search_shard_one(shard: ShardArtifact, query: np.ndarray, k: int, params: ScannParams | None = None,
                     exclude_rows: np.ndarray | None = None) -> tuple[list[int], list[float]] | None:
    """One query's top-``k`` rows of a ScaNN shard as Python lists, or None where :func:`search_shard`
    must answer instead.

    The single-query serving path: one ScaNN ``search`` call and two ``tolist``, none of the batched
    path's numpy bookkeeping (on 2 x 50k MiniLM shards that bookkeeping, the merge and the query
    checks cost ~40 us of a ~200 us query). None when the shard is exact (no searcher) or ScaNN
    came back with fewer than ``min(k, shard.count)`` results (its NaN padding: the searched leaves
    held too few points); :func:`search_shard` then widens the search.

    Args:
        shard: the shard.
        query: (D,) float32, already normalised as the index expects.
        k: neighbours wanted.
        params: search-time overrides of ``shard.params``.
        exclude_rows: shard rows to leave out (e.g. :meth:`ShardArtifact.rows_of` of items already
            seen); ScaNN is asked for as many more neighbours as the batched path asks for.

    Returns:
        ``(rows, scores)``: up to ``k`` rows best first and their dot products (``min(k, count)``, less
        the excluded rows when the shard holds fewer eligible items), the same answer as row 0 of
        ``search_shard(shard, query[None], k, [exclude_rows], params)`` without its padding.
    """
    if shard.searcher is None:
        return None
    p = params or shard.params
    n = shard.count
    kk = min(k, n)
    extra = 0 if exclude_rows is None else len(exclude_rows)
    final_nn = min(n, kk + _headroom(extra))
    idx, dist = shard.searcher.search(query, final_nn, _reorder_depth(p, n, final_nn),
                                      -1 if p.num_leaves_to_search is None else p.num_leaves_to_search)
    rows, scores = idx.tolist(), dist.tolist()
    if not extra:
        if len(scores) < kk or scores[-1] != scores[-1]:  # short, or NaN-padded at its end
            return None
        return rows, scores
    excluded = set(exclude_rows.tolist())
    kept = [i for i, (row, score) in enumerate(zip(rows, scores, strict=True))
            if row not in excluded and score == score][:kk]  # score == score: not NaN padding
    if len(kept) < min(kk, n - extra):  # the searched leaves held too few eligible items
        return None
    return [rows[i] for i in kept], [scores[i] for i in kept]


def _headroom(excluded: int) -> int:
    """Extra neighbours asked of ScaNN for a query with ``excluded`` rows left out of a shard: the count
    rounded up to a power of two, so that the batched path's queries share calls by headroom."""
    return 0 if excluded == 0 else 1 << (excluded - 1).bit_length()


def _reorder_depth(params: ScannParams, n: int, final_nn: int) -> int:
    """Candidates rescored exactly for ``final_nn`` results: the tuned depth, scaled up with ``final_nn``."""
    return min(n, max(params.reorder_num_neighbors,
                      math.ceil(final_nn * params.reorder_num_neighbors / params.num_neighbors)))


def _scann_search(searcher, params: ScannParams, n: int, queries: np.ndarray, k: int,
                  exclude_rows: Sequence[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    q = queries.shape[0]
    kk = min(k, n)
    if exclude_rows is None:  # the common serving path: one batched call, no headroom bookkeeping
        idx, dist = _scann_raw(searcher, params, n, queries, kk, params.num_leaves_to_search)
        if idx.shape[1] == kk and not np.isnan(dist[:, -1]).any():
            # every query got kk results (ScaNN pads a short answer at its end with NaN): the answer as is
            return idx.astype(np.int64), np.asarray(dist, dtype=np.float32)
        rows, scores = _drop_padding(idx, dist, kk, None)
        if rows[:, -1].min() < 0 and _can_widen(params):
            short = np.flatnonzero(rows[:, -1] < 0)  # fewer than kk found: the searched leaves held too few
            rows[short], scores[short] = _scann_call(searcher, params, n, queries[short], kk, kk, None,
                                                     params.num_leaves)
        return rows, scores
    extras = np.asarray([len(r) for r in exclude_rows])
    # Queries needing the same headroom (rounded up to a power of two) share one batched call.
    buckets = np.asarray([_headroom(int(e)) for e in extras], dtype=np.int64)
    groups = [(b, np.flatnonzero(buckets == b)) for b in np.unique(buckets)]
    rows_out = scores_out = None
    for bucket, members in groups:
        final_nn = min(n, kk + int(bucket))
        excl = [exclude_rows[i] for i in members]
        rows, scores = _scann_call(searcher, params, n, queries[members], final_nn, kk, excl,
                                   params.num_leaves_to_search)
        if (rows < 0).any():
            short = (rows != -1).sum(axis=1) < np.minimum(kk, n - extras[members])
            if short.any() and _can_widen(params):
                # The searched leaves held too few items: search every leaf for those queries.
                retry = np.flatnonzero(short)
                sub_excl = [excl[i] for i in retry]
                rows[retry], scores[retry] = _scann_call(searcher, params, n, queries[members[retry]], final_nn,
                                                         kk, sub_excl, params.num_leaves)
        if len(groups) == 1:  # every query in one call: its arrays are the answer
            return rows, scores
        if rows_out is None:
            rows_out = np.full((q, kk), -1, np.int64)
            scores_out = np.full((q, kk), -np.inf, np.float32)
        rows_out[members], scores_out[members] = rows, scores
    return rows_out, scores_out


def _can_widen(params: ScannParams) -> bool:
    """Whether a search that came back short can be repeated over more leaves (every leaf)."""
    return params.mode == "tree_ah" and params.num_leaves_to_search < params.num_leaves


def _scann_call(searcher, params: ScannParams, n: int, queries: np.ndarray, final_nn: int, k: int,
                exclude_rows: Sequence[np.ndarray] | None, leaves: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One ``search_batched`` call, then drop padding (NaN) and excluded rows, keeping the first ``k``."""
    return _drop_padding(*_scann_raw(searcher, params, n, queries, final_nn, leaves), k, exclude_rows)


def _scann_raw(searcher, params: ScannParams, n: int, queries: np.ndarray, final_nn: int,
               leaves: int | None) -> tuple[np.ndarray, np.ndarray]:
    """ScaNN's own ``search_batched`` answer (uint32 rows, NaN-padded dot products), with the reordering
    depth scaled up with ``final_nn`` and ``leaves`` None meaning ScaNN's own setting (AH shards have no
    leaves)."""
    pre = _reorder_depth(params, n, final_nn)
    return searcher.search_batched(queries, final_num_neighbors=final_nn, pre_reorder_num_neighbors=pre,
                                   leaves_to_search=-1 if leaves is None else leaves)


def _drop_padding(idx: np.ndarray, dist: np.ndarray, k: int,
                  exclude_rows: Sequence[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """ScaNN's answer without its padding (NaN) and excluded rows, the first ``k`` kept, padded to ``k``."""
    idx = idx.astype(np.int64)  # (B, final_nn)
    dist = np.asarray(dist, dtype=np.float32)  # (B, final_nn): dot products, best first; NaN pads
    drop = np.isnan(dist)
    if exclude_rows is not None:
        for i, rows in enumerate(exclude_rows):
            if len(rows):
                drop[i] |= np.isin(idx[i], rows)
    if not drop.any() and idx.shape[1] >= k:  # nothing to drop: ScaNN's order is the answer
        return idx[:, :k], dist[:, :k]
    keep_order = np.argsort(drop, axis=1, kind="stable")[:, :k]  # kept entries first, in score order
    rows = np.take_along_axis(idx, keep_order, axis=1)
    scores = np.take_along_axis(dist, keep_order, axis=1)
    dropped = np.take_along_axis(drop, keep_order, axis=1)
    rows[dropped], scores[dropped] = -1, -np.inf
    if rows.shape[1] < k:
        pad = k - rows.shape[1]
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return rows, scores
