"""Offline evaluation helpers: a per-user time split, per-user grouping and a popularity baseline.

All work on flat numpy arrays of interactions (one entry per event), with users and items already
mapped to dense rows ``0..U-1`` and ``0..I-1``.

Example::

    split = time_split(users, ts, holdout=1)
    train_items = group_by_user(users[split.train], items[split.train], U, ts[split.train])
    test_items = group_by_user(users[split.test], items[split.test], U)
    pop = PopularityBaseline.fit(items[split.train], num_items=I)
    ranking_metrics(pop.scores(U), test_items, ks=(10,), exclude=train_items)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TimeSplit:
    """Boolean masks over the interaction arrays: ``train`` and ``test`` are disjoint and cover all."""

    train: np.ndarray
    test: np.ndarray


def time_split(user_idx: np.ndarray, timestamps: np.ndarray, holdout: int = 1, min_train: int = 1) -> TimeSplit:
    """Hold out each user's last ``holdout`` interactions (by timestamp, ties by array order).

    Users with fewer than ``holdout + min_train`` interactions stay entirely in train.

    Args:
        user_idx: ``(E,)`` user row per event.
        timestamps: ``(E,)`` event time (ms).
        holdout: L, events per user moved to test.
        min_train: events a user must keep in train to get a test set at all.

    Example::

        time_split(np.array([0, 0, 0, 1]), np.array([3, 1, 2, 5]), holdout=1).test
        # array([ True, False, False, False])      (user 1 has too few events)
    """
    user_idx = np.asarray(user_idx)
    timestamps = np.asarray(timestamps)
    E = len(user_idx)
    order = np.lexsort((np.arange(E), timestamps, user_idx))  # by user, then time, then position
    sorted_users = user_idx[order]
    _, first, counts = np.unique(sorted_users, return_index=True, return_counts=True)
    n_user = np.repeat(counts, counts)  # (E,) events of this row's user, in sorted order
    rank = np.arange(E) - np.repeat(first, counts)  # 0 = user's oldest event
    test_sorted = (rank >= n_user - holdout) & (n_user >= holdout + min_train)
    test = np.zeros(E, dtype=bool)
    test[order] = test_sorted
    return TimeSplit(train=~test, test=test)


def group_by_user(user_idx: np.ndarray, item_idx: np.ndarray, num_users: int,
                  timestamps: np.ndarray | None = None) -> list[np.ndarray]:
    """Item rows per user (chronological when ``timestamps`` is given, else in array order).

    Returns:
        ``num_users`` int64 arrays; users without events get an empty one.
    """
    user_idx = np.asarray(user_idx)
    item_idx = np.asarray(item_idx, dtype=np.int64)
    keys = (np.arange(len(user_idx)), user_idx) if timestamps is None else \
        (np.arange(len(user_idx)), np.asarray(timestamps), user_idx)
    order = np.lexsort(keys)
    bounds = np.searchsorted(user_idx[order], np.arange(num_users + 1))
    items = item_idx[order]
    return [items[bounds[u]:bounds[u + 1]] for u in range(num_users)]


class PopularityBaseline:
    """Scores every item by its (weighted) training interaction count, the same for every user.

    Example::

        pop = PopularityBaseline.fit(train_items, num_items=1000)
        pop.scores(num_users=50)        # (50, 1000) view, no copy per user
    """

    def __init__(self, item_scores: np.ndarray):
        self.item_scores = np.asarray(item_scores, dtype=np.float64)

    @classmethod
    def fit(cls, item_idx: np.ndarray, num_items: int, weights: np.ndarray | None = None) -> PopularityBaseline:
        """Count interactions per item (summing ``weights`` when given)."""
        return cls(np.bincount(np.asarray(item_idx, dtype=np.int64), weights=weights, minlength=num_items))

    def scores(self, num_users: int) -> torch.Tensor:
        """``(num_users, I)`` score matrix (an expanded view of one row)."""
        return torch.from_numpy(self.item_scores).expand(num_users, -1)
