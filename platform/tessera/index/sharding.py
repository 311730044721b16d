"""Balanced, deterministic assignment of item ids to index shards.

Items are ordered by a stable hash of their id (BLAKE2b, the id breaking hash ties) and the order
is cut into ``num_shards`` contiguous runs whose sizes differ by at most one. The result depends
only on the set of ids, not on their input order or on the process (Python's ``hash`` is salted
per process, so it is not used), so every Ray worker computes the same split.

A shard is then a contiguous range of keys ``(hash, id)``. :func:`shard_bounds` finds the first key
of each shard after the first from the ids' 64-bit hashes alone (8 bytes an item, no id strings:
the index job's planner), and :func:`locate_shard` puts any member back in its shard from those
``S - 1`` keys (the index job's split tasks, part by part).

Example::

    parts = assign_shards(ids, num_shards=3)      # list of 3 int64 row-index arrays
    shard_ids = [[ids[i] for i in rows] for rows in parts]
    bounds = shard_bounds(hash_ids(ids), 3)
    locate_shard(shard_key(shard_ids[2][0]), bounds)  # 2
"""

from __future__ import annotations

import bisect
import hashlib
import math
from typing import Callable, Iterable, Sequence

import numpy as np


def id_hash(item_id: str) -> int:
    """A stable 64-bit hash of an item id (same in every process and Python version)."""
    return int.from_bytes(hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest(), "big")


def shard_key(item_id: str) -> tuple[int, str]:
    """The key items are ordered by before the cut into shards: the id's hash, then the id."""
    return id_hash(item_id), item_id


def first_duplicate(ids: Iterable) -> object | None:
    """The first id of ``ids`` seen before it (None: all distinct), for an error message."""
    seen = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return None


def assign_shards(ids: Sequence[str], num_shards: int) -> list[np.ndarray]:
    """Split rows ``0..len(ids)-1`` into ``num_shards`` near-equal groups, deterministically.

    Args:
        ids: unique item ids (duplicates raise ``ValueError``).
        num_shards: number of groups (>= 1); more shards than ids leaves some groups empty.

    Returns:
        ``num_shards`` int64 arrays of row indices into ``ids``, each sorted ascending; sizes are
        ``len(ids) // num_shards`` or one more.

    Example::

        assign_shards(["a", "b", "c", "d", "e"], 2)  # two arrays, of 3 and 2 rows
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError(f"item ids must be unique: {first_duplicate(ids)!r} appears more than once")
    hashes = hash_ids(str(i) for i in ids)
    order = sorted(range(n), key=lambda r: (int(hashes[r]), str(ids[r])))  # shard_key, hashed in one pass
    runs = np.array_split(np.asarray(order, dtype=np.int64), num_shards)
    return [np.sort(run) for run in runs]


def hash_ids(ids: Iterable[str]) -> np.ndarray:
    """:func:`id_hash` of each id, as uint64."""
    ids = list(ids)
    return np.fromiter((id_hash(i) for i in ids), dtype=np.uint64, count=len(ids))


def shard_sizes(num_items: int, num_shards: int) -> list[int]:
    """The sizes :func:`assign_shards` gives: ``num_items // num_shards``, the first ``num_items %
    num_shards`` shards one more."""
    base, extra = divmod(num_items, num_shards)
    return [base + (j < extra) for j in range(num_shards)]


def shard_bounds(hashes: np.ndarray, num_shards: int,
                 tied_ids: Callable[[int], list[str]] | None = None) -> list[tuple[int, str]]:
    """The first :func:`shard_key` of each shard after the first, of the split :func:`assign_shards`
    makes of the items whose :func:`hash_ids` are ``hashes``, from the hashes alone.

    A cut falling on a hash no other item has is ``(hash, "")`` (every key with that hash is at or
    past it); one falling among items sharing a hash (a 64-bit collision, or duplicate ids) needs
    their ids, which ``tied_ids(hash)`` returns (all of them; the call is only made then).

    Args:
        hashes: (N,) uint64, one per unique item, any order.
        num_shards: shards (1 to N).
        tied_ids: the ids of the items with a given hash.

    Returns:
        ``num_shards - 1`` keys, ascending, for :func:`locate_shard`.

    Raises:
        ValueError: more shards than items, or a tie the ids do not settle.
    """
    n = len(hashes)
    if not 1 <= num_shards <= max(n, 1):
        raise ValueError(f"num_shards must be between 1 and the {n} items, got {num_shards}")
    ordered = np.sort(np.asarray(hashes, dtype=np.uint64))
    bounds = []
    for rank in np.cumsum(shard_sizes(n, num_shards))[:-1]:
        h = ordered[rank]
        first, last = np.searchsorted(ordered, h, "left"), np.searchsorted(ordered, h, "right")
        if last - first == 1:
            bounds.append((int(h), ""))
            continue
        ids = sorted(tied_ids(int(h))) if tied_ids is not None else []
        if len(ids) != last - first or len(set(ids)) != len(ids):
            raise ValueError(f"a shard cut falls among {last - first} items sharing the hash {int(h)}, and their ids "
                             f"({len(ids)} given, {len(set(ids))} distinct) do not order them")
        bounds.append((int(h), ids[rank - first]))
    return bounds


def locate_shard(key: tuple[int, str], bounds: Sequence[tuple[int, str]]) -> int:
    """The shard of a member item from its :func:`shard_key` and :func:`shard_bounds` (``len(bounds) + 1``
    shards). The key, not the id, so that a caller routing one item to several indexes hashes it once.

    Only meaningful for items that were split: any other id also lands in some shard.
    """
    return bisect.bisect_right(bounds, key)


def num_shards_for(num_items: int, max_shard_size: int) -> int:
    """Fewest shards that keep every shard at or under ``max_shard_size`` items (at least 1).

    Example::

        num_shards_for(250_000, 100_000)  # 3
    """
    if max_shard_size < 1:
        raise ValueError(f"max_shard_size must be >= 1, got {max_shard_size}")
    return max(1, math.ceil(num_items / max_shard_size))
