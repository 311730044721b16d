"""The recall self-check: the saved, sharded index against exact search, on real queries.

Runs as one Ray task per index (it needs every item vector for the exact reference, which should
not pass through the driver). It loads the shards back from storage exactly as serving does
(checksums verified), then measures recall@k on

* **user queries** (fused index only): users sampled from the interaction log; each one's history
  (all but the last ``holdout`` events, the most recent ``max_history`` of them, items outside the
  index dropped) goes through the bundle's user tower, at the time of the first held-out event;
* **item queries**: a sample of the index's own vectors (for a per-modality index, that modality's),
  each searched with its own item excluded (in the exact answer too), so the item is no free hit.

A returned item counts as a hit when its exact score ties the exact k-th score (within
:data:`~tessera.index.sharded.RECALL_TIE_TOLERANCE`): see :func:`tessera.index.measure_recall`.

Example::

    checks = run_self_check(storage, index_uri, manifest, parts, "fused", cfg.self_check,
                            model_uri=cfg.model_uri, interactions_uri=src.interactions_uri)
    checks["user"].recall
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tessera.index import IndexManifest, RecallCheck, ShardedIndex, load_shard, measure_recall
from tessera.index_job.build import read_rows
from tessera.index_job.config import SelfCheckConfig
from tessera.storage import Storage, join_uri


def read_interactions(storage: Storage, interactions_uri: str) -> pa.Table:
    """``user_id``, ``item_id``, ``ts``, ``weight`` of every part of the interaction log."""
    files = storage.list_files(interactions_uri, ".parquet")
    if not files:
        raise FileNotFoundError(f"no interaction parts under {interactions_uri}")
    tables = []
    for uri in files:
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            tables.append(pq.read_table(f, columns=["user_id", "item_id", "ts", "weight"]))
    return pa.concat_tables(tables)


def user_query_vectors(user_tower, interactions: pa.Table, ids: list[str], vectors: np.ndarray,
                       cfg: SelfCheckConfig, count: int | None = None, skip: int = 0) -> np.ndarray:
    """User vectors of up to ``count`` sampled users with a non-empty history in the index.

    Users are drawn in one seeded random order (``cfg.seed``); the sample is ``count`` users after
    the first ``skip`` of that order, so the build's tuning queries (``skip = cfg.user_queries``)
    never include a user the self-check measures.

    Args:
        user_tower: the bundle's :class:`~tessera.models.UserTower` (eval mode).
        interactions: the log (``user_id``, ``item_id``, ``ts``, ``weight``).
        ids, vectors: the indexed items and their fused vectors (N, E).
        cfg: holdout, history length, seed.
        count: users wanted (None: ``cfg.user_queries``).
        skip: users of the seeded order left out first.

    Returns:
        (Q, E) float32 user vectors (Q may be below the sample size for a small log).
    """
    import torch

    from tessera.models.history import pad_histories

    row_of = {item: r for r, item in enumerate(ids)}
    _, users = np.unique(np.asarray(interactions.column("user_id").to_pylist(), dtype=object), return_inverse=True)
    items = interactions.column("item_id").to_pylist()
    ts = interactions.column("ts").to_numpy()
    weight = interactions.column("weight").to_numpy(zero_copy_only=False).astype(np.float32)
    order = np.lexsort((np.arange(len(ts)), ts, users))  # by user, then time, then log order
    _, first, counts = np.unique(users[order], return_index=True, return_counts=True)
    eligible = np.flatnonzero(counts > cfg.holdout)
    count = cfg.user_queries if count is None else count
    picked = np.sort(np.random.default_rng(cfg.seed).permutation(eligible)[skip:skip + count])
    max_len = cfg.max_history or user_tower.config.max_history
    hist_rows, hist_ts, hist_w, query_ts = [], [], [], []
    for u in picked:
        events = order[first[u]:first[u] + counts[u]]  # this user's events, oldest first
        history, held = events[:len(events) - cfg.holdout], events[len(events) - cfg.holdout:]
        history = [e for e in history if items[e] in row_of][-max_len:]
        if not history:
            continue
        hist_rows.append(np.asarray([row_of[items[e]] for e in history], np.int64))
        hist_ts.append(ts[history])
        hist_w.append(weight[history])
        query_ts.append(int(ts[held[0]]) if len(held) else int(ts[history[-1]]))
    if not hist_rows:
        return np.empty((0, vectors.shape[1]), np.float32)
    batch = pad_histories(hist_rows, max_len, timestamps=hist_ts, weights=hist_w)
    item_vecs = torch.from_numpy(vectors)[batch.item_idx]  # (Q, N, E)
    with torch.no_grad():
        out = user_tower(item_vecs, batch.mask, batch.timestamps_ms, torch.tensor(query_ts), batch.weights)
    return out.numpy().astype(np.float32)  # (Q, E)


def tuning_user_queries(storage: Storage, parts: list[str], column: str, cfg: SelfCheckConfig, model_uri: str,
                        interactions_uri: str, torch_threads: int = 1) -> np.ndarray:
    """User vectors for the shard builds' tuning: ``cfg.tuning_user_queries`` users, none of them
    among the self-check's (the next users of the same seeded order). A Ray task in the job: it
    reads every item vector of ``column`` and the log, and returns only the (Q, E) queries."""
    import torch

    from tessera.models.bundle import ModelBundle

    torch.set_num_threads(torch_threads)
    ids, vectors = read_rows(storage, parts, column)
    user_tower = ModelBundle.load(storage, model_uri).user_tower.eval()
    return user_query_vectors(user_tower, read_interactions(storage, interactions_uri), ids, vectors, cfg,
                              count=cfg.tuning_user_queries, skip=cfg.user_queries)


def load_saved_index(storage: Storage, index_uri: str, manifest: IndexManifest) -> ShardedIndex:
    """The shards as written, each verified against the checksum in ``manifest``."""
    shards = [load_shard(storage, join_uri(index_uri, s.name), expected_manifest_sha256=sha)
              for s, sha in ((s, manifest.shard_manifest_sha256[s.name]) for s in manifest.shards)]
    return ShardedIndex(shards, manifest=manifest)


def run_self_check(storage: Storage, index_uri: str, manifest: IndexManifest, parts: list[str], column: str,
                   cfg: SelfCheckConfig, model_uri: str | None = None,
                   interactions_uri: str | None = None, torch_threads: int = 1) -> dict[str, RecallCheck]:
    """Recall checks of one saved index, by query source (``user``, ``item``).

    Args:
        storage: object storage.
        index_uri: the index folder (the version root, or ``.../modal/<modality>``).
        manifest: its manifest (not yet written: the checks go into it).
        parts: the vectors parts.
        column: the vectors column the index was built from.
        cfg: the self-check settings.
        model_uri: the bundle, for user queries (None: item queries only).
        interactions_uri: the log, for user queries (None: item queries only).
        torch_threads: threads for the user tower.
    """
    index = load_saved_index(storage, index_uri, manifest)
    ids, vectors = read_rows(storage, parts, column)
    checks: dict[str, RecallCheck] = {}
    rng = np.random.default_rng(cfg.seed)
    if cfg.item_queries:
        sample = np.sort(rng.choice(len(ids), size=min(cfg.item_queries, len(ids)), replace=False))
        check = measure_recall(index, vectors[sample], ids, vectors, cfg.k, query_ids=[ids[r] for r in sample])
        checks["item"] = check.model_copy(update={
            "queries": f"{len(sample)} sampled item vectors ({column}), each item excluded from its own results"})
    if cfg.user_queries and model_uri and interactions_uri:
        import torch

        from tessera.models.bundle import ModelBundle

        torch.set_num_threads(torch_threads)
        user_tower = ModelBundle.load(storage, model_uri).user_tower.eval()
        queries = user_query_vectors(user_tower, read_interactions(storage, interactions_uri), ids, vectors, cfg)
        if len(queries):
            check = measure_recall(index, queries, ids, vectors, cfg.k)
            checks["user"] = check.model_copy(update={
                "queries": f"{len(queries)} user vectors (user tower over histories, last {cfg.holdout} "
                           f"event(s) held out) from {interactions_uri}"})
    return checks
