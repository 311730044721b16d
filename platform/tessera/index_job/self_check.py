"""The recall self-check: the saved, sharded index against exact search, on real queries; measured a
shard at a time, where each shard's vectors already are.

Queries:

* **item queries**: a seeded sample of the index's own rows (for a per-modality index, that
  modality's vectors), each searched with its own item excluded (in the exact answer too), so the
  item is no free hit. The split tasks pick the sampled rows out of the parts as they read them
  (:func:`tessera.index_job.build.split_vectors`).
* **user queries** (fused index only): users sampled from the interaction log (:func:`select_users`);
  each one's history (all but the last ``holdout`` events, the most recent ``max_history`` of them, items
  outside the index dropped) goes through the bundle's user tower at the time of the first held-out
  event (:func:`user_queries`). Only the history items' vectors are gathered, again by the split tasks.
  The next users of the same seeded order make the fused shards' tuning queries.

Each shard's build task saves its shard, loads it back from storage exactly as serving does (checksums
verified) and measures it against its own vectors (:func:`check_saved_shard`); the driver merges the
shards' small results into the index's recall (:func:`tessera.index.combine_recall`): the same figure
as :func:`tessera.index.measure_recall` over the whole index, without any process holding a whole
index column. A returned item counts as a hit when its exact score ties the exact k-th score (within
:data:`~tessera.index.RECALL_TIE_TOLERANCE`).

Example::

    users = select_users(storage, interactions_uri, cfg.self_check, tuning_count=200, max_history=50,
                         indexed=np.sort(fused_hashes))
    checked, tuning = user_queries(storage, model_uri, users, cfg.self_check, 1, (ids, vectors))
    parts = check_saved_shard(storage, shard_uri, sha256, ids, vectors, checked, (query_ids, queries), k=10)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tessera.embed.ids import is_member
from tessera.index import RecallCheck, ShardRecall, combine_recall, hash_ids, load_shard, shard_recall
from tessera.index_job.config import SelfCheckConfig
from tessera.storage import Storage

Piece = tuple[list[str], np.ndarray]  # item ids and their (n, D) float32 vectors


def gather_rows(*pieces: Piece) -> Piece:
    """One piece of many, in order: an index's item queries from every split task (a small Ray task), the
    users' history items (:func:`user_queries`)."""
    dim = max((p[1].shape[1] for p in pieces), default=0)
    ids = [i for p_ids, _ in pieces for i in p_ids]
    vectors = np.concatenate([v for _, v in pieces if len(v)]) if ids else np.empty((0, dim), np.float32)
    return ids, vectors


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


@dataclass
class UserHistory:
    """One sampled user: the history the user tower reads (see :func:`sample_users` for what is kept),
    and the time of the query (the first held-out event)."""

    user_id: str
    items: list[str]
    ts: np.ndarray  # (n,) int64 ms, oldest first
    weights: np.ndarray  # (n,) float32
    query_ts: int


@dataclass
class UserSample:
    """The self-check's users and, after them in the same seeded order, the tuning users."""

    check: list[UserHistory] = field(default_factory=list)
    tuning: list[UserHistory] = field(default_factory=list)

    def wanted(self) -> list[str]:
        """Every item of every sampled history, sorted: the rows the split tasks gather."""
        return sorted({item for h in (*self.check, *self.tuning) for item in h.items})


@dataclass
class UserEvents:
    """A log's events grouped by user, without turning its columns into Python objects (a log of
    hundreds of millions of events stays in Arrow and numpy arrays).

    Attributes:
        log: the interaction log (rows without a user id dropped).
        names: the distinct user ids, sorted.
        order: event rows by user (in ``names`` order), then time, then log order.
        first, counts: per user, where its events start in ``order`` and how many there are.
    """

    log: pa.Table
    names: pa.Array
    order: np.ndarray
    first: np.ndarray
    counts: np.ndarray

    @classmethod
    def of(cls, interactions: pa.Table) -> UserEvents:
        log = interactions
        if log.column("user_id").null_count:
            log = log.filter(pc.is_valid(log.column("user_id")))
        user_col = log.column("user_id")
        if not pa.types.is_string(user_col.type) and not pa.types.is_large_string(user_col.type):
            user_col = user_col.cast(pa.string())  # dictionary, string_view, binary (UTF-8 checked)
        # encoded chunk by chunk (no copy of the column into one array: its text may pass 2 GiB), one
        # dictionary for all chunks
        encoded = pc.dictionary_encode(user_col).unify_dictionaries()
        dictionary = encoded.chunk(0).dictionary if encoded.num_chunks else pa.array([], pa.string())
        codes = np.concatenate([c.indices.to_numpy() for c in encoded.chunks]) if encoded.num_chunks \
            else np.empty(0, np.int64)
        sort = pc.array_sort_indices(dictionary).to_numpy()  # sorted place -> dictionary entry
        rank = np.empty(len(sort), np.int64)
        rank[sort] = np.arange(len(sort))
        users = rank[codes]  # (n,) each event's user, numbered in sorted-id order
        ts = log.column("ts").to_numpy()
        order = np.lexsort((np.arange(len(ts)), ts, users))
        counts = np.bincount(users, minlength=len(sort))
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        return cls(log, dictionary.take(pa.array(sort, pa.int64())), order, first, counts)


def sample_users(events: pa.Table | UserEvents, cfg: SelfCheckConfig, count: int, skip: int = 0,
                 max_history: int | None = None, indexed: np.ndarray | None = None) -> list[UserHistory]:
    """Up to ``count`` users with more than ``cfg.holdout`` events, after the first ``skip`` of one seeded
    random order (``cfg.seed``) over the users sorted by id: the tuning users (``skip = cfg.user_queries``)
    are never checked ones.

    Each history keeps its events on items whose id hash is in ``indexed`` (sorted uint64 hashes of the
    index's items, :func:`tessera.index.hash_ids`; None keeps every item), the last ``max_history`` of
    them (None: all): what the user tower will read, so long histories stay small. Events without an
    item id are dropped.

    Args:
        events: the interaction log, or its :class:`UserEvents` (to draw several samples from one).
    """
    events = events if isinstance(events, UserEvents) else UserEvents.of(events)
    eligible = np.flatnonzero(events.counts > cfg.holdout)
    picked = np.sort(np.random.default_rng(cfg.seed).permutation(eligible)[skip:skip + count])
    spans = [events.order[events.first[u]:events.first[u] + events.counts[u]] for u in picked]  # oldest first
    held = [rows[len(rows) - cfg.holdout:] for rows in spans]
    histories = [rows[:len(rows) - cfg.holdout] for rows in spans]
    wanted = np.concatenate([*histories, *(h[:1] for h in held)]) if len(picked) else np.empty(0, np.int64)
    items = take_rows(events.log.column("item_id"), wanted).to_pylist()
    ts = take_rows(events.log.column("ts"), wanted).to_numpy(zero_copy_only=False)
    weight = take_rows(events.log.column("weight"), wanted).to_numpy(zero_copy_only=False).astype(np.float32)
    sample, at, held_at = [], 0, sum(len(h) for h in histories)
    for u, history, query in zip(picked, histories, held, strict=True):
        span = slice(at, at + len(history))  # this user's history in the taken rows
        at += len(history)
        if len(query):
            query_ts, held_at = int(ts[held_at]), held_at + 1
        else:  # holdout 0: the time of the last event
            query_ts = int(ts[span][-1])
        mine = items[span]
        keep = np.asarray([i is not None for i in mine], bool)
        if indexed is not None and keep.any():
            keep[keep] = is_member(indexed, hash_ids([i for i in mine if i is not None]))
        kept = np.flatnonzero(keep)
        if max_history is not None:
            kept = kept[-max_history:]
        sample.append(UserHistory(events.names[int(u)].as_py(), [mine[j] for j in kept], ts[span][kept],
                                  weight[span][kept], query_ts))
    return sample


def take_rows(column: pa.ChunkedArray, rows: np.ndarray) -> pa.Array:
    """``column``'s values at ``rows``, in that order, taken chunk by chunk: a take on the whole chunked
    column would first join its chunks (a copy of the column, which fails past 2 GiB of text)."""
    rows = np.asarray(rows, np.int64)
    bounds = np.cumsum([0, *(len(c) for c in column.chunks)])
    by_row = np.argsort(rows, kind="stable")
    chunk_of = np.searchsorted(bounds, rows[by_row], side="right") - 1
    pieces = [column.chunk(int(j)).take(pa.array(rows[by_row][chunk_of == j] - bounds[j], pa.int64()))
              for j in np.unique(chunk_of)]
    in_row_order = pa.concat_arrays(pieces) if pieces else pa.array([], column.type)
    return in_row_order.take(pa.array(np.argsort(by_row, kind="stable"), pa.int64()))


def select_users(storage: Storage, interactions_uri: str, cfg: SelfCheckConfig, tuning_count: int,
                 max_history: int | None = None, indexed: np.ndarray | None = None) -> UserSample:
    """A Ray task in the job: read the log once, sample the check's users (``cfg.user_queries``) and the
    tuning users (``tuning_count``); returns their histories (each at most ``max_history`` events on
    ``indexed`` items, see :func:`sample_users`), not the log."""
    events = UserEvents.of(read_interactions(storage, interactions_uri))
    return UserSample(
        sample_users(events, cfg, cfg.user_queries, 0, max_history, indexed) if cfg.user_queries else [],
        sample_users(events, cfg, tuning_count, cfg.user_queries, max_history, indexed) if tuning_count else [])


def user_vectors(user_tower, histories: list[UserHistory], ids: list[str], vectors: np.ndarray,
                 max_history: int | None = None) -> np.ndarray:
    """The user tower's vectors of ``histories``, each keeping its items found in ``ids`` (the index's
    items: at least those of the histories), the last ``max_history`` of them (None: the tower's own
    limit); a user left with no item is dropped.

    Returns:
        (Q, E) float32, Q <= len(histories).
    """
    import torch

    from tessera.models.history import pad_histories

    row_of = {item: r for r, item in enumerate(ids)}
    max_len = max_history or user_tower.config.max_history
    rows, stamps, weights, query_ts = [], [], [], []
    for h in histories:
        kept = [j for j, item in enumerate(h.items) if item in row_of][-max_len:]
        if kept:
            rows.append(np.asarray([row_of[h.items[j]] for j in kept], np.int64))
            stamps.append(h.ts[kept])
            weights.append(h.weights[kept])
            query_ts.append(h.query_ts)
    if not rows:
        return np.empty((0, vectors.shape[1]), np.float32)
    batch = pad_histories(rows, max_len, timestamps=stamps, weights=weights)
    item_vecs = torch.from_numpy(vectors)[batch.item_idx]  # (Q, N, E)
    with torch.no_grad():
        out = user_tower(item_vecs, batch.mask, batch.timestamps_ms, torch.tensor(query_ts), batch.weights)
    return out.numpy().astype(np.float32)  # (Q, E)


def user_queries(storage: Storage, model_uri: str, users: UserSample, cfg: SelfCheckConfig, torch_threads: int,
                 *pieces: Piece) -> tuple[np.ndarray, np.ndarray]:
    """A Ray task in the job: the check's and the tuning's user vectors, from the history items' fused
    vectors (``pieces``: the split tasks' rows of :meth:`UserSample.wanted` found in the fused index)."""
    import torch

    from tessera.models.bundle import ModelBundle

    torch.set_num_threads(torch_threads)
    ids, vectors = gather_rows(*pieces)
    user_tower = ModelBundle.load(storage, model_uri).user_tower.eval()
    return (user_vectors(user_tower, users.check, ids, vectors, cfg.max_history),
            user_vectors(user_tower, users.tuning, ids, vectors, cfg.max_history))


def check_saved_shard(storage: Storage, shard_uri: str, manifest_sha256: str, ids: list[str], vectors: np.ndarray,
                      users: np.ndarray | None, item_queries: Piece | None, k: int) -> dict[str, ShardRecall]:
    """One shard's share of the self-check, in its build task: load the shard back from ``shard_uri``
    as serving does (every checksum verified against ``shard.json``, itself against ``manifest_sha256``)
    and measure it on the user queries and the item queries (their own items excluded) against
    ``ids`` / ``vectors``, the rows it was built from. Keyed ``user`` / ``item``; a query set that is
    None or empty is skipped."""
    shard = load_shard(storage, shard_uri, expected_manifest_sha256=manifest_sha256)
    found: dict[str, ShardRecall] = {}
    if users is not None and len(users):
        found["user"] = shard_recall(shard, vectors, users, k, ids=ids)
    if item_queries is not None and len(item_queries[0]):
        query_ids, queries = item_queries
        found["item"] = shard_recall(shard, vectors, queries, k, query_ids=query_ids, ids=ids)
    return found


def combine_checks(by_shard: list[dict[str, ShardRecall]], k: int,
                   descriptions: dict[str, str]) -> dict[str, RecallCheck]:
    """One index's recall checks from its shards' :func:`check_saved_shard` results (shard order), by
    query source; ``descriptions[source]`` says where the queries came from, ``{n}`` their number."""
    checks = {}
    for source in ("item", "user"):
        if by_shard and source in by_shard[0]:
            check = combine_recall([parts[source] for parts in by_shard], k, query_items_excluded=source == "item")
            checks[source] = check.model_copy(update={"queries": descriptions[source].format(n=check.num_queries)})
    return checks


def item_sample(num_items: int, cfg: SelfCheckConfig) -> np.ndarray:
    """Sorted row positions (in part order, among the index's rows) of the item queries."""
    return np.sort(np.random.default_rng(cfg.seed).choice(num_items, size=min(cfg.item_queries, num_items),
                                                          replace=False))

