"""The recall self-check: the saved, sharded index against exact search, on real queries; measured a
shard at a time, where each shard's vectors already are.

Queries:

* **item queries**: a seeded sample of the index's own rows (for a per-modality index, that
  modality's vectors), each searched with its own item excluded (in the exact answer too), so the
  item is no free hit. The split tasks pick the sampled rows out of the parts as they read them
  (:func:`tessera.index_job.build.split_vectors`).
* **user queries** (fused index only): users sampled from the interaction log (:func:`select_users`:
  the first users of a seeded hash order, found in two passes of Ray tasks over the log's files, no
  process holding the log); each one's history (all but the last ``holdout`` events, the most recent
  ``max_history`` of them, items outside the index kept, as training keeps them: an item without a
  usable modality has a fused vector all the same) goes through the bundle's user tower, its
  time gaps measured to the history's latest event as in training and serving (:func:`user_queries`).
  Each is searched as serving searches with ``exclude_seen`` (the default): without every item the user
  interacted with before the held-out events (:attr:`UserHistory.seen`, older than the history too),
  in the exact answer as well, so the index must find the best items past them.
  Only the history items' vectors are gathered, again by the split tasks. The next users of the same
  order make the fused shards' tuning queries.

Each shard's build task saves its shard, loads it back from storage exactly as serving does (checksums
verified) and measures it against its own vectors (:func:`check_saved_shard`); the driver merges the
shards' small results into the index's recall (:func:`tessera.index.combine_recall`): the same figure
as :func:`tessera.index.measure_recall` over the whole index, without any process holding a whole
index column. A returned item counts as a hit when its exact score ties the exact k-th score (within
:data:`~tessera.index.RECALL_TIE_TOLERANCE`).

Example::

    users = select_users(storage, interactions_uri, cfg.self_check, tuning_count=200, max_history=50,
                         task_options={"num_cpus": 0.5}, known=np.sort(catalog_hashes))
    checked, tuning = user_queries(storage, model_uri, users, cfg.self_check, 1, (ids, vectors))
    parts = check_saved_shard(storage, shard_uri, sha256, ids, vectors, checked, (query_ids, queries), k=10)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tessera.embed.ids import is_member
from tessera.index import RecallCheck, ShardRecall, combine_recall, hash_ids, load_shard, shard_recall
from tessera.index_job.config import SelfCheckConfig
from tessera.interactions import (
    UserColumn,
    encode_strings,
    event_order,
    hash_user_ids,
    interaction_files,
    normalize_log,
    read_log_file,
    runs,
)
from tessera.storage import Storage

Piece = tuple[list[str], np.ndarray]  # item ids and their (n, D) float32 vectors


def gather_rows(*pieces: Piece) -> Piece:
    """One piece of many, in order: an index's item queries from every split task (a small Ray task), the
    users' history items (:func:`user_queries`)."""
    dim = max((p[1].shape[1] for p in pieces), default=0)
    ids = [i for p_ids, _ in pieces for i in p_ids]
    vectors = np.concatenate([v for _, v in pieces if len(v)]) if ids else np.empty((0, dim), np.float32)
    return ids, vectors


@dataclass
class UserHistory:
    """One sampled user: the history the user tower reads (see :func:`sample_users` for what is kept),
    (the tower measures time gaps to its latest event), and ``seen``: every distinct catalog item of the
    user's events before the held-out ones, sorted (what serving's ``exclude_seen`` leaves out of the
    user's results at that time: older events than the history's too)."""

    user_id: str
    items: list[str]
    ts: np.ndarray  # (n,) int64 ms, oldest first
    weights: np.ndarray  # (n,) float32
    seen: list[str] = field(default_factory=list)


@dataclass
class UserQueries:
    """The check's user vectors and, per vector, the items its search leaves out (:attr:`UserHistory.seen`)."""

    vectors: np.ndarray  # (Q, E) float32
    seen: list[list[str]]

    def __len__(self) -> int:
        return len(self.vectors)


@dataclass
class UserSample:
    """The self-check's users and, after them in the same seeded order, the tuning users."""

    check: list[UserHistory] = field(default_factory=list)
    tuning: list[UserHistory] = field(default_factory=list)

    def wanted(self) -> list[str]:
        """Every item of every sampled history, sorted: the rows the split tasks gather."""
        return sorted({item for h in (*self.check, *self.tuning) for item in h.items})


USERS_KEY_SALT = "tessera.index_job.self_check.users"


def user_order_key(seed: int) -> str:
    """The hash key whose order of user ids is the sample's seeded random order (16 characters, one per
    ``seed``; see :func:`tessera.embed.ids.hash_ids`)."""
    return hashlib.sha256(f"{USERS_KEY_SALT}:{seed}".encode()).hexdigest()[:16]


@dataclass
class _Events:
    """What one piece of the log holds of some users: their events cut to what a sample can use (see
    :func:`_user_events`).

    Attributes:
        table: ``user_id``, ``item_id`` (strings), ``ts`` (int64), ``weight`` (float32).
        users: the users' ids; ``counts`` (same length): their events in the piece, cut or not.
        older: ``user_id``, ``item_id``: the distinct items of the events the cut left out (all of them
            before any history's held-out events: seen items).
    """

    table: pa.Table
    users: list[str]
    counts: np.ndarray
    older: pa.Table


def _timed_users(table: pa.Table, key: str, known: np.ndarray | None = None) -> tuple[UserColumn, np.ndarray]:
    """The piece's user column, and (n,) whether each event counts: a user id, a time and an item id, of an
    item of the catalog (hash in sorted ``known``; None: any item), as training and serving count events
    (training drops an event on an unknown item before it holds anything out)."""
    users = UserColumn.of(table.column("user_id"), key)
    counted = (users.codes >= 0) & table.column("ts").is_valid().to_numpy(zero_copy_only=False)
    if "item_id" in table.column_names:
        counted &= _usable(table.column("item_id"), known)
    return users, counted


def _lowest_users(table: pa.Table, key: str, budget: int, known: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The ``budget`` lowest distinct user hashes (under ``key``) of a piece of the log, sorted, and each
    one's events in the piece. The union over the pieces holds the log's ``budget`` lowest, each with all
    of its pieces' counts (a piece's lower hashes are among the log's lower ones)."""
    users, counted = _timed_users(table, key, known)
    per_name = np.bincount(users.codes[counted], minlength=len(users.names))
    hashes, of_name = np.unique(users.hashes, return_inverse=True)
    counts = np.bincount(of_name, weights=per_name, minlength=len(hashes)).astype(np.int64)
    present = counts > 0
    return hashes[present][:budget], counts[present][:budget]


def _user_events(table: pa.Table, key: str, chosen: np.ndarray, max_history: int | None, holdout: int,
                 known: np.ndarray | None = None) -> _Events:
    """The events of a piece of the log whose user's hash is in sorted ``chosen``, each user's cut to
    what its history can need whatever the other pieces hold: its last ``max_history + holdout`` events
    (``max_history`` None: all; at least one, so that every chosen user has a run of events). Events
    without a user id, a time or a catalog item are ignored."""
    users, counted = _timed_users(table, key, known)
    wanted = np.append(is_member(chosen, users.hashes), False)  # the last entry: code -1, no user id
    rows = np.flatnonzero(wanted[users.codes] & counted)
    codes = users.codes[rows]
    ts = take_rows(table.column("ts"), rows).to_numpy(zero_copy_only=False).astype(np.int64)
    items = take_rows(table.column("item_id"), rows)
    if items.type != pa.string():
        items = items.cast(pa.string())  # dictionary, large_string, null: one type over the pieces
    weights = take_rows(table.column("weight"), rows)  # float32 (read_log_file)
    # training's order (same-time events by item id, then weight), so the cut below keeps what it reads
    order = event_order(ts, pc.rank(items, tiebreaker="dense").to_numpy(), weights.to_numpy(zero_copy_only=False),
                        codes)
    rows, codes, ts = rows[order], codes[order], ts[order]
    items, weights = items.take(pa.array(order, pa.int64())), weights.take(pa.array(order, pa.int64()))
    starts, ends = runs(codes)
    run_end = np.repeat(ends, ends - starts)  # each event's user's end
    last = len(rows) if max_history is None else max(max_history + holdout, 1)
    recent = run_end - 1 - np.arange(len(rows)) < last  # the user's last events
    kept, cut = np.flatnonzero(recent), pa.array(np.flatnonzero(~recent), pa.int64())
    out = pa.table({
        "user_id": users.names.take(pa.array(codes[kept], pa.int64())),
        "item_id": items.take(pa.array(kept, pa.int64())),
        "ts": pa.array(ts[kept], pa.int64()),
        "weight": weights.take(pa.array(kept, pa.int64())),
    })
    older = pa.table({"user_id": users.names.take(pa.array(codes, pa.int64()).take(cut)),
                      "item_id": items.take(cut)}).group_by(["user_id", "item_id"]).aggregate([])
    return _Events(out, users.names.take(pa.array(codes[starts], pa.int64())).to_pylist(), ends - starts, older)


def _usable(items: pa.Array | pa.ChunkedArray, known: np.ndarray | None) -> np.ndarray:
    """(n,) bool: events with an item id whose hash is in sorted ``known`` (the catalog's; None: any item
    id), those counted at all; each distinct item hashed once."""
    values, codes = encode_strings(items if isinstance(items, pa.ChunkedArray) else pa.chunked_array([items]))
    usable = codes >= 0
    if known is not None and usable.any():
        usable[usable] = is_member(known, hash_ids(values.to_pylist()))[codes[usable]]
    return usable


def _pick(events: list[_Events], key: str, cfg: SelfCheckConfig, count: int, skip: int,
          max_history: int | None) -> list[UserHistory]:
    """Users ``skip .. skip + count - 1`` of the sample's order among those with more than ``cfg.holdout``
    events in ``events`` (every piece's), with their histories."""
    totals: dict[str, int] = {}
    for piece in events:
        for user, n in zip(piece.users, piece.counts.tolist(), strict=True):
            totals[user] = totals.get(user, 0) + n
    names = list(totals)
    hashes = hash_user_ids(pa.array(names, pa.string()), key)
    ordered = [names[j] for j in np.lexsort((np.asarray(names, dtype=object), hashes))] if names else []
    picked = [u for u in ordered if totals[u] > cfg.holdout][skip:skip + count]
    if not picked:
        return []
    log = pa.concat_tables([piece.table for piece in events])
    log = log.filter(pc.is_in(log.column("user_id"), pa.array(picked, pa.string())))
    older: dict[str, set[str]] = {user: set() for user in picked}
    for piece in events:
        for user, item in zip(piece.older.column("user_id").to_pylist(), piece.older.column("item_id").to_pylist(),
                              strict=True):
            if user in older:
                older[user].add(item)
    log = log.sort_by([("user_id", "ascending"), ("ts", "ascending"), ("item_id", "ascending"),
                       ("weight", "ascending")])  # training's order (:func:`event_order`)
    names, codes = encode_strings(log.column("user_id"))
    spans = {names[int(codes[a])].as_py(): (int(a), int(b)) for a, b in zip(*runs(codes), strict=True)}
    ts = log.column("ts").to_numpy()
    weights = log.column("weight").to_numpy().astype(np.float32)
    items = log.column("item_id").combine_chunks()
    sample = []
    for user in picked:
        a, b = spans[user]
        cut = b - cfg.holdout  # the held-out events: [cut, b)
        seen = older[user].union(items[a:cut].to_pylist())
        kept = np.arange(a, cut)
        if max_history is not None:
            kept = kept[max(len(kept) - max_history, 0):]
        sample.append(UserHistory(user, items.take(pa.array(kept, pa.int64())).to_pylist(), ts[kept], weights[kept],
                                  sorted(seen)))
    return sample


def sample_users(log: pa.Table, cfg: SelfCheckConfig, count: int, skip: int = 0,
                 max_history: int | None = None, known: np.ndarray | None = None) -> list[UserHistory]:
    """Up to ``count`` users with more than ``cfg.holdout`` events, after the first ``skip`` of one seeded
    random order (users by their id's hash under :func:`user_order_key` of ``cfg.seed``, ties by id): the
    tuning users (``skip = cfg.user_queries``) are never checked ones. A log held in memory;
    :func:`select_users` draws the same sample from a log in storage, a file at a time.

    Each history keeps its events (oldest first, in :func:`tessera.interactions.event_order`: by time, then item
    id and weight) before the last ``cfg.holdout`` ones, the last ``max_history`` of them (None: all): what the
    user tower will read, so long histories stay small. An item outside the fused index (no usable modality)
    stays in a history, as training keeps it. Events without a user id, a time or an item of the catalog
    (hash in sorted ``known``, :func:`tessera.index.hash_ids`; None: any item id) are ignored. A
    history's ``seen`` holds the items of all the user's events before the held-out ones, older ones too."""
    log = normalize_log(log, "(a table)")
    return _first_users(lambda key, budget: [_lowest_users(log, key, budget, known)],
                        lambda key, chosen: [_user_events(log, key, chosen, max_history, cfg.holdout, known)],
                        cfg, count, skip, max_history)


def _first_users(lowest, events, cfg: SelfCheckConfig, count: int, skip: int,
                 max_history: int | None) -> list[UserHistory]:
    """The sample from a log in pieces. ``lowest(key, budget)``: each piece's :func:`_lowest_users` (so
    the first users of the order and their event counts); ``events(key, chosen)``: each piece's
    :class:`_Events` of the users whose hash is in ``chosen``. Only the first hashes with more than
    ``cfg.holdout`` events are fetched (more if users sharing a hash fall short); the budget starts at
    twice the users asked for and grows (x4) while too few of its users have enough events."""
    if count <= 0:
        return []
    key = user_order_key(cfg.seed)
    budget = 2 * (skip + count) + 64
    while True:
        union, totals = _lowest_of(lowest(key, budget))
        eligible = union[:budget][totals[:budget] > cfg.holdout]
        take, picked = skip + count, []
        while len(eligible):
            picked = _pick(events(key, eligible[:take]), key, cfg, count, skip, max_history)
            if len(picked) == count or take >= len(eligible):
                break
            take += count - len(picked)  # some hash was shared by users that each fall short
        if len(picked) == count or len(union) < budget:  # enough, or every user of the log was a candidate
            return picked
        budget *= 4


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


def _lowest_in_files(pieces: list[tuple[int, str]], storage: Storage, key: str,
                     budget: int, known: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`_lowest_users` over several files, merged into one (the lowest ``budget`` of their union, each
    with its files' summed counts: exact for the same reason as per file)."""
    return [_lowest_of([_lowest_users(read_log_file(storage, uri, ["user_id", "ts", "item_id"]), key, budget, known)
                        for _, uri in pieces], budget)]


def _lowest_of(found: list[tuple[np.ndarray, np.ndarray]], budget: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """The union of :func:`_lowest_users` results, sorted, counts summed; its lowest ``budget`` (None: all)."""
    if not found:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    union, at = np.unique(np.concatenate([h for h, _ in found]), return_inverse=True)
    totals = np.bincount(at, weights=np.concatenate([c for _, c in found]), minlength=len(union)).astype(np.int64)
    return (union, totals) if budget is None else (union[:budget], totals[:budget])


def _events_in_file(piece: int, uri: str, storage: Storage, key: str, chosen: np.ndarray,
                    max_history: int | None, holdout: int, known: np.ndarray | None = None) -> _Events:
    del piece  # :func:`_map_log`'s callback shape; the events' order is their own (:func:`event_order`)
    return _user_events(read_log_file(storage, uri), key, chosen, max_history, holdout, known)


def _over_files(fn, per_task: bool, pieces: list[tuple[int, str]], *args) -> list:
    return fn(pieces, *args) if per_task else [fn(piece, uri, *args) for piece, uri in pieces]


def _map_log(fn, files: list[str], task_options: dict | None, files_per_task: int, *args,
             per_task: bool = False) -> list:
    """``fn(piece, uri, *args)`` for every file of the log, in order (``per_task``: ``fn(pieces, *args)``
    once per group of files, returning a list): in Ray tasks of ``task_options`` when given (and Ray is
    up), ``files_per_task`` files a task (an ``ObjectRef`` among ``args`` reaches ``fn`` as its value)."""
    import ray

    pieces = list(enumerate(files))
    chunks = [pieces[i:i + files_per_task] for i in range(0, len(pieces), files_per_task)]
    if task_options is None or not ray.is_initialized():
        args = tuple(ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args)
        return [r for chunk in chunks for r in _over_files(fn, per_task, chunk, *args)]
    remote = ray.remote(_over_files).options(**task_options)
    return [r for got in ray.get([remote.remote(fn, per_task, chunk, *args) for chunk in chunks]) for r in got]


def select_users(storage: Storage, interactions_uri: str, cfg: SelfCheckConfig, tuning_count: int,
                 max_history: int | None = None, task_options: dict | None = None, files_per_task: int = 8,
                 known: np.ndarray | None = None) -> UserSample:
    """The check's users (``cfg.user_queries``) and after them the tuning users (``tuning_count``): the
    sample :func:`sample_users` draws from the whole log, read a file at a time (in Ray tasks of
    ``task_options`` when given, ``files_per_task`` files each) without any process holding the log.

    Passes over the files: each file's lowest user hashes with their event counts, then the events of
    the first users of the order with enough events, each file's cut to what a history can need
    (:func:`_user_events`), with the distinct items of their older events (what :attr:`UserHistory.seen` adds:
    as many as a user has distinct items, so a bot with 100k of them sends 100k ids a file); see
    :func:`_first_users`. The driver holds the hashes and those users' events and seen items."""
    import ray

    files = interaction_files(storage, interactions_uri)
    if task_options is not None and ray.is_initialized():  # once, for every task of every pass
        known = ray.put(known) if known is not None else None
    picked = _first_users(
        lambda key, budget: _map_log(_lowest_in_files, files, task_options, files_per_task, storage, key, budget,
                                     known, per_task=True),
        lambda key, chosen: _map_log(_events_in_file, files, task_options, files_per_task, storage, key, chosen,
                                     max_history, cfg.holdout, known),
        cfg, cfg.user_queries + tuning_count, 0, max_history)
    return UserSample(picked[:cfg.user_queries], picked[cfg.user_queries:])


def user_vectors(user_tower, histories: list[UserHistory], ids: list[str], vectors: np.ndarray,
                 max_history: int | None = None) -> UserQueries:
    """The user tower's vectors of ``histories``, each keeping its items found in ``ids`` (items with a
    fused vector: at least those of the histories), the last ``max_history`` of them (None: the tower's
    own limit); a user left with no item is dropped.

    Returns:
        Q <= len(histories) vectors, (Q, E) float32, each with its user's seen items.
    """
    import torch

    from tessera.models.history import pad_histories

    row_of = {item: r for r, item in enumerate(ids)}
    max_len = max_history or user_tower.config.max_history
    rows, stamps, weights, seen = [], [], [], []
    for h in histories:
        kept = [j for j, item in enumerate(h.items) if item in row_of][-max_len:]
        if kept:
            rows.append(np.asarray([row_of[h.items[j]] for j in kept], np.int64))
            stamps.append(h.ts[kept])
            weights.append(h.weights[kept])
            seen.append(h.seen)
    if not rows:
        return UserQueries(np.empty((0, vectors.shape[1]), np.float32), [])
    batch = pad_histories(rows, max_len, timestamps=stamps, weights=weights)
    item_vecs = torch.from_numpy(vectors)[batch.item_idx]  # (Q, N, E)
    with torch.no_grad():
        out = user_tower(item_vecs, batch.mask, batch.timestamps_ms, batch.weights)
    return UserQueries(out.numpy().astype(np.float32), seen)  # (Q, E)


def user_queries(storage: Storage, model_uri: str, users: UserSample, cfg: SelfCheckConfig, torch_threads: int,
                 *pieces: Piece) -> tuple[UserQueries, np.ndarray]:
    """A Ray task in the job: the check's user vectors (with their seen items) and the tuning's, from the
    history items' fused vectors (``pieces``: the split tasks' rows of :meth:`UserSample.wanted`)."""
    import torch

    from tessera.models.bundle import ModelBundle

    torch.set_num_threads(torch_threads)
    ids, vectors = gather_rows(*pieces)
    user_tower = ModelBundle.load(storage, model_uri).user_tower.eval()
    return (user_vectors(user_tower, users.check, ids, vectors, cfg.max_history),
            user_vectors(user_tower, users.tuning, ids, vectors, cfg.max_history).vectors)


def check_saved_shard(storage: Storage, shard_uri: str, manifest_sha256: str, ids: list[str], vectors: np.ndarray,
                      users: UserQueries | None, item_queries: Piece | None, k: int) -> dict[str, ShardRecall]:
    """One shard's share of the self-check, in its build task: load the shard back from ``shard_uri``
    as serving does (every checksum verified against ``shard.json``, itself against ``manifest_sha256``)
    and measure it on the user queries (their seen items excluded) and the item queries (their own items
    excluded) against ``ids`` / ``vectors``, the rows it was built from. Keyed ``user`` / ``item``; a
    query set that is None or empty is skipped."""
    shard = load_shard(storage, shard_uri, expected_manifest_sha256=manifest_sha256)
    found: dict[str, ShardRecall] = {}
    if users is not None and len(users):
        found["user"] = shard_recall(shard, vectors, users.vectors, k, ids=ids, exclude=users.seen)
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
            check = combine_recall([parts[source] for parts in by_shard], k, query_items_excluded=source == "item",
                                   seen_items_excluded=source == "user")
            checks[source] = check.model_copy(update={"queries": descriptions[source].format(n=check.num_queries)})
    return checks


def item_sample(num_items: int, cfg: SelfCheckConfig) -> np.ndarray:
    """Sorted row positions (in part order, among the index's rows) of the item queries."""
    return np.sort(np.random.default_rng(cfg.seed).choice(num_items, size=min(cfg.item_queries, num_items),
                                                          replace=False))

