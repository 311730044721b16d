"""Balanced, deterministic assignment of item ids to index shards.

Items are ordered by a stable hash of their id (BLAKE2b, the id breaking hash ties) and the order
is cut into ``num_shards`` contiguous runs whose sizes differ by at most one. The result depends
only on the set of ids, not on their input order or on the process (Python's ``hash`` is salted
per process, so it is not used), so every Ray worker computes the same split.

A shard is then a contiguous range of keys ``(hash, id)``: :func:`shard_bounds` gives the first key of
each shard after the first, and :func:`locate_shard` puts any member back in its shard from those
``S - 1`` keys alone, without the whole id list (the index job's split tasks do this part by part).

Example::

    parts = assign_shards(ids, num_shards=3)      # list of 3 int64 row-index arrays
    shard_ids = [[ids[i] for i in rows] for rows in parts]
    bounds = shard_bounds(shard_ids)
    locate_shard(shard_key(shard_ids[2][0]), bounds)  # 2
"""

from __future__ import annotations

import bisect
import hashlib
import math
from typing import Sequence

import numpy as np


def id_hash(item_id: str) -> int:
    """A stable 64-bit hash of an item id (same in every process and Python version)."""
    return int.from_bytes(hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest(), "big")


def shard_key(item_id: str) -> tuple[int, str]:
    """The key items are ordered by before the cut into shards: the id's hash, then the id."""
    return id_hash(item_id), item_id


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
        raise ValueError("item ids must be unique")
    hashes = np.fromiter((id_hash(str(i)) for i in ids), dtype=np.uint64, count=n)
    order = sorted(range(n), key=lambda r: (int(hashes[r]), str(ids[r])))  # shard_key, hashed in one pass
    runs = np.array_split(np.asarray(order, dtype=np.int64), num_shards)
    return [np.sort(run) for run in runs]


def shard_bounds(shards: Sequence[Sequence[str]]) -> list[tuple[int, str]]:
    """The smallest :func:`shard_key` of each shard after the first, for :func:`locate_shard`.

    Args:
        shards: the ids of each shard, as :func:`assign_shards` split them (none empty).

    Raises:
        ValueError: an empty shard, or shards that are not contiguous key ranges in order.
    """
    if any(len(s) == 0 for s in shards):
        raise ValueError("every shard needs at least one item to be located by its bounds")
    lows = [min(map(shard_key, s)) for s in shards]
    highs = [max(map(shard_key, s)) for s in shards]
    if any(highs[i] >= lows[i + 1] for i in range(len(shards) - 1)):
        raise ValueError("shards are not contiguous ranges of (hash, id) in order: not from assign_shards")
    return lows[1:]


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
