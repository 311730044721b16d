"""The interaction log (``corpus/interactions/part-*.parquet``: ``user_id``, ``item_id``, ``ts``, ``event``,
``weight``) as the index job and the serving snapshot read it: a file at a time, user ids dictionary-encoded
in Arrow (a log of hundreds of millions of events never becomes a Python object per event).

Example::

    for uri in interaction_files(storage, interactions_uri):
        table = storage.read_parquet(uri, LOG_COLUMNS)
        users = UserColumn.of(table.column("user_id"), key)   # names, per-event codes, keyed hashes
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tessera.storage import Storage

LOG_COLUMNS = ["user_id", "item_id", "ts", "weight"]


def interaction_files(storage: Storage, interactions_uri: str) -> list[str]:
    """The log's Parquet files, sorted (their order is the log's order).

    Raises:
        FileNotFoundError: none under ``interactions_uri``."""
    files = storage.list_files(interactions_uri, ".parquet")
    if not files:
        raise FileNotFoundError(f"no interaction parts under {interactions_uri}")
    return files


def read_interactions(storage: Storage, interactions_uri: str) -> pa.Table:
    """``user_id``, ``item_id``, ``ts``, ``weight`` of every part of the interaction log, in one table
    (for small logs and benchmarks; the jobs and the app read a file at a time)."""
    return pa.concat_tables([storage.read_parquet(uri, LOG_COLUMNS) for uri in interaction_files(storage,
                                                                                                 interactions_uri)])


def event_order(ts: np.ndarray, item_key: np.ndarray, weight: np.ndarray,
                user: np.ndarray | None = None) -> np.ndarray:
    """Indices putting events in the one order training, the index self-check and serving all read a
    history in: by ``user`` (when given), then time; events at the same time by item id, then weight.

    ``item_key`` is anything that sorts as the item ids do (catalog rows of a catalog sorted by id, or
    the ids' ranks). Not the log's order: training receives each user's events in the order of Ray
    Data's shuffle, and a log of second-resolution times holds many ties, so the order is what decides
    which same-time event is held out and which one a history ends with."""
    keys = [np.asarray(weight, np.float32), np.asarray(item_key), np.asarray(ts)]  # weights as every reader holds them
    if user is not None:
        keys.append(np.asarray(user))
    return np.lexsort(keys)


def hash_user_ids(ids: pa.Array | Sequence[str], key: str) -> np.ndarray:
    """(n,) uint64 keyed hashes of user ids (strings) under ``key`` (see :func:`tessera.embed.ids.hash_ids`)."""
    from tessera.embed.ids import hash_ids

    return hash_ids(ids, key)


@dataclass
class UserColumn:
    """A log's ``user_id`` column, dictionary-encoded chunk by chunk (a large log's text may pass 2 GiB).

    Attributes:
        names: the distinct user ids (strings).
        codes: (n,) int64, each event's entry in ``names``; -1 for an event without a user id.
        hashes: (len(names),) uint64, the ids' hashes under ``key``.
    """

    names: pa.Array
    codes: np.ndarray
    hashes: np.ndarray

    @classmethod
    def of(cls, column: pa.ChunkedArray, key: str) -> UserColumn:
        names, codes = encode_strings(column)
        return cls(names, codes, hash_user_ids(names, key))


def encode_strings(column: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """A string column (or one castable to strings: dictionary, large, binary UTF-8) as its distinct values
    (``pa.string()``) and (n,) int64 codes into them, -1 for a null; encoded chunk by chunk (no copy of the
    column into one array, whose text may pass 2 GiB)."""
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        column = column.cast(pa.string())
    encoded = pc.dictionary_encode(column)
    if not encoded.num_chunks:
        return pa.array([], pa.string()), np.empty(0, np.int64)
    values = encoded.chunk(encoded.num_chunks - 1).dictionary
    # Arrow gives every chunk the same dictionary (one memo table for the column); unify otherwise
    if not all(_shared(c.dictionary, values) for c in encoded.chunks):
        encoded = encoded.unify_dictionaries()
        values = encoded.chunk(0).dictionary
    if values.type != pa.string():
        values = values.cast(pa.string())  # large_string: one type whatever each file holds
    codes = np.concatenate([c.indices.fill_null(-1).to_numpy().astype(np.int64) for c in encoded.chunks])
    return values, codes


def runs(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each run of equal values of ``codes`` (events grouped by user) starts, and where it ends
    (exclusive): two (runs,) int64 arrays."""
    if not len(codes):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    return starts, np.r_[starts[1:], len(codes)].astype(np.int64)


def last_flagged(flags: np.ndarray, run_end: np.ndarray, k: int) -> np.ndarray:
    """(n,) bool: the flagged events among the last ``k`` flagged ones of their run, for events grouped
    in runs (each event's run ending, exclusive, at ``run_end``; oldest first within a run)."""
    after = np.r_[np.cumsum(flags[::-1])[::-1], 0]  # flagged events from each position to the end
    return flags & (after[:len(flags)] - after[run_end] <= k)


def _shared(a: pa.Array, b: pa.Array) -> bool:
    """Whether two arrays are one array's views: same length, same data buffer (or none)."""
    da, db = a.buffers()[-1], b.buffers()[-1]
    return len(a) == len(b) and (da is None) == (db is None) and (da is None or da.address == db.address)
