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


def log_fingerprint(storage: Storage, interactions_uri: str) -> dict:
    """What the log under ``interactions_uri`` holds now, from one listing: its Parquet files' count, total
    bytes, and a sha256 of each file's name (relative to the log), size and version tag
    (:meth:`~tessera.storage.Storage.list_file_stats`: its ETag on S3). A file added, removed or changed
    changes it; reading no event. Empty (``files`` 0) when there is no log."""
    import hashlib

    root = interactions_uri.rstrip("/") + "/"
    stats = storage.list_file_stats(interactions_uri, ".parquet")
    digest = hashlib.sha256()
    for uri, size, tag in stats:
        name = uri[len(root):] if uri.startswith(root) else uri
        digest.update(f"{name}\t{size}\t{tag}\n".encode())
    return {"files": len(stats), "bytes": sum(size for _, size, _ in stats), "sha256": digest.hexdigest()}


def read_interactions(storage: Storage, interactions_uri: str) -> pa.Table:
    """``user_id``, ``item_id``, ``ts``, ``weight`` of every part of the interaction log, in one table
    (for small logs and benchmarks; the jobs and the app read a file at a time)."""
    tables = [read_log_file(storage, uri) for uri in interaction_files(storage, interactions_uri)]
    return pa.concat_tables(tables, promote_options="permissive")  # (a file's ids may be dictionary-encoded)


class LogSchemaError(ValueError):
    """An interaction-log file a reader cannot take: a required column missing, or of a type that is not
    one the log's columns can be read from (the message names the file and the column)."""


def log_schema_error(err: BaseException) -> LogSchemaError | None:
    """The :class:`LogSchemaError` behind ``err``, if any: Ray raises a task's exception as an instance of
    its class, but Ray Data wraps a map function's in its own (the original is a ``__cause__``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(getattr(err, "cause", None), LogSchemaError):
            return err.cause  # the original, whose text is its message alone (a RayTaskError's holds a traceback)
        if isinstance(err, LogSchemaError):
            return err
        seen.add(id(err))
        err = err.__cause__ or getattr(err, "cause", None) or err.__context__
    return None


_MS_PER = {"s": 1000, "ms": 1, "us": 1 / 1000, "ns": 1 / 1_000_000}


def normalize_log(table: pa.Table, where: str, columns: Sequence[str] = LOG_COLUMNS,
                  drop_incomplete: bool = False) -> pa.Table:
    """``columns`` of one piece of the log in the types every reader (training, the index self-check,
    serving) takes them in, so that the three read one log alike:

    - ``user_id``, ``item_id``: strings (integer ids as their digits; string and dictionary-of-string
      columns as they are);
    - ``ts``: int64 milliseconds; an Arrow timestamp or date column is converted from its own unit (a
      ``timestamp[us]`` column read as milliseconds put every gap 1000 times too far); integers are taken
      as milliseconds already;
    - ``weight``: float32; a missing column, a null, a NaN or an infinite one counts the event once
      (1.0), where a NaN made the user tower's output NaN.

    ``drop_incomplete``: leave out events without a user, an item or a time (serving and the self-check
    ignore them; training would have made one user of every event without a user id).

    Raises:
        LogSchemaError: a column other than ``weight`` missing, or of a type none of these reads from."""
    out = {}
    for name in columns:
        if name not in table.column_names:
            if name == "weight":
                out[name] = pa.chunked_array([pa.array(np.ones(table.num_rows, np.float32))])
                continue
            raise LogSchemaError(f"interaction log {where}: no '{name}' column (it has "
                                 f"{', '.join(table.column_names) or 'none'})")
        column = table.column(name)
        try:
            out[name] = _NORMAL[name](column)
        except (TypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise LogSchemaError(f"interaction log {where}: column '{name}' of type {column.type}: {err}") from None
    result = pa.table(out)
    if drop_incomplete:
        keep = None
        for name in ("user_id", "item_id", "ts"):
            if name in result.column_names:
                valid = pc.is_valid(result.column(name))
                keep = valid if keep is None else pc.and_(keep, valid)
        if keep is not None and pc.sum(keep.cast(pa.int64())).as_py() != result.num_rows:
            result = result.filter(keep)  # (a copy of every column: only when some event goes)
    return result


def _ids(column: pa.ChunkedArray) -> pa.ChunkedArray:
    t = column.type
    values = t.value_type if pa.types.is_dictionary(t) else t
    if pa.types.is_string(values) or pa.types.is_large_string(values):
        return column
    if pa.types.is_integer(values) or pa.types.is_null(values) or pa.types.is_binary(values) \
            or pa.types.is_large_binary(values):  # binary: text written without its UTF-8 tag (checked here)
        return pc.cast(column, pa.string())
    if pa.types.is_floating(values):  # integer ids written by pandas with a null among them
        column = pc.cast(column, values) if pa.types.is_dictionary(t) else column
        whole = pc.equal(pc.floor(column), column)
        if not pc.all(pc.or_kleene(whole, pc.is_null(column))).as_py():
            raise TypeError("ids must be strings or integers (this float column holds fractions)")
        return pc.cast(pc.cast(column, pa.int64()), pa.string())
    raise TypeError("ids must be strings or integers")


def _ms(column: pa.ChunkedArray) -> pa.ChunkedArray:
    t = column.type
    if pa.types.is_integer(t) or pa.types.is_null(t):
        return pc.cast(column, pa.int64())
    if pa.types.is_timestamp(t):
        raw, per = pc.cast(column, pa.int64()), _MS_PER[t.unit]
        return raw if per == 1 else pc.multiply(raw, per) if per > 1 else pc.divide(raw, round(1 / per))
    if pa.types.is_date32(t):
        return pc.multiply(pc.cast(pc.cast(column, pa.int32()), pa.int64()), 86_400_000)
    if pa.types.is_date64(t):
        return pc.cast(column, pa.int64())
    if pa.types.is_floating(t):  # integers written by pandas with a null among them
        return pc.cast(pc.floor(pc.if_else(pc.is_nan(column), None, column)), pa.int64())
    raise TypeError("times must be int64 milliseconds, an Arrow timestamp or a date")


# Integer times are taken as milliseconds (ARCHITECTURE.md). A log of Unix seconds (or micro- or
# nanoseconds) reads without error, only every time gap off by 1000x: a log whose times all fall in
# these ranges, read as milliseconds, is most likely in another unit (see :func:`ts_unit_warning`).
_SECONDS_LIKE_MS = (946_684_800, 4_102_444_800)  # 2000-01-01 .. 2100-01-01 in seconds: January 1970 as ms
_BEYOND_MS = 4_102_444_800_000  # 2100-01-01 in ms: micro- or nanoseconds past it


def ts_unit_warning(ts_min: int | None, ts_max: int | None) -> str | None:
    """A warning when a log's integer times, taken as milliseconds as the contract says, look like another
    unit: all within 2000-2100 read as seconds (January 1970 as milliseconds), or past the year 2100 as
    milliseconds (micro- or nanoseconds). None when they look like milliseconds, or are no real dates at
    all (small synthetic times); a heuristic over the log's range: one event outside the window (a 0
    written for a missing time) turns it off."""
    if ts_min is None or ts_max is None:
        return None
    if _SECONDS_LIKE_MS[0] <= ts_min and ts_max < _SECONDS_LIKE_MS[1]:
        unit = "seconds"
    elif ts_min >= _BEYOND_MS:
        unit = "microseconds or nanoseconds"
    else:
        return None
    return (f"the interaction log's ts runs from {ts_min} to {ts_max}: as milliseconds (what an integer ts is "
            f"taken as) that is {_as_date(ts_min)} to {_as_date(ts_max)}; it looks like {unit}, which puts every "
            f"time gap the towers read off by a factor of 1000 or more. Write ts as int64 milliseconds, or give "
            f"the column its unit as an Arrow timestamp type (the same int64 values: e.g. pa.timestamp('s') for "
            f"Unix seconds), which every reader converts from its own unit")


def _as_date(ms: int) -> str:
    import datetime

    try:
        return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    except (OverflowError, OSError, ValueError):
        return "past the year 9999"


def _weights(column: pa.ChunkedArray) -> pa.ChunkedArray:
    t = column.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_null(t)):
        raise TypeError("weights must be numbers")
    w = pc.cast(column, pa.float32(), safe=False)  # an int64 weight past float32's exact range is rounded
    return pc.fill_null(pc.if_else(pc.is_finite(w), w, None), 1.0)  # NaN / inf (1e300 as float32) count once


_NORMAL = {"user_id": _ids, "item_id": _ids, "ts": _ms, "weight": _weights}


def read_log_file(storage: Storage, uri: str, columns: Sequence[str] = LOG_COLUMNS,
                  drop_incomplete: bool = False) -> pa.Table:
    """``columns`` of one Parquet file of the log, as :func:`normalize_log` gives them (a file without a
    ``weight`` column reads as weights of 1.0)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)

    def read() -> pa.Table:
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            return parquet.read(columns=_present(parquet, columns, uri))

    try:
        table = storage.retrying_io(f"read {uri}", read)
    except (pa.ArrowInvalid, KeyError) as err:  # not Parquet, or a column twice
        raise LogSchemaError(f"interaction log {uri}: cannot be read as Parquet: {err}") from None
    return normalize_log(table, uri, columns, drop_incomplete)


def iter_log_file(storage: Storage, uri: str, columns: Sequence[str] = LOG_COLUMNS, drop_incomplete: bool = False):
    """:func:`read_log_file` a row group at a time, for a reader that never needs the whole file at once
    (training: a multi-GB file held whole, then copied by the conversion, ran workers out of memory). Each
    row group is one read, retried as :meth:`~tessera.storage.Storage.retrying_io` retries (a store
    restart does not fail the file after some of it was read)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)

    def footer() -> tuple[list[str], int]:
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            return _present(parquet, columns, uri), parquet.num_row_groups

    def group(g: int, wanted: list[str]) -> pa.Table:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).read_row_group(g, columns=wanted)

    try:
        wanted, groups = storage.retrying_io(f"read {uri}", footer)
        for g in range(groups):
            table = storage.retrying_io(f"read {uri} row group {g}", lambda g=g: group(g, wanted))
            yield normalize_log(table, uri, columns, drop_incomplete)
    except (pa.ArrowInvalid, KeyError) as err:
        raise LogSchemaError(f"interaction log {uri}: cannot be read as Parquet: {err}") from None


def _present(parquet, columns: Sequence[str], uri: str) -> list[str]:
    names = parquet.schema_arrow.names
    twice = sorted({c for c in columns if names.count(c) > 1})
    if twice:
        raise LogSchemaError(f"interaction log {uri}: column {twice[0]!r} appears more than once")
    return [c for c in columns if c in names]


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
