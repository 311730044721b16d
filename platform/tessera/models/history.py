"""Left-padded history batches for the user tower and the ranker.

Example::

    batch = pad_histories([np.array([4, 7]), np.array([], dtype=np.int64)],
                          timestamps=[np.array([10, 20]), np.array([], dtype=np.int64)], max_len=3)
    batch.item_idx          # tensor([[0, 4, 7], [0, 0, 0]]);  batch.mask: [[F, T, T], [F, F, F]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class HistoryBatch:
    """A padded batch of user histories, oldest first, real items right-aligned.

    Attributes:
        item_idx: ``(B, N)`` int64 catalog row of each item (``pad_index`` where padded).
        mask: ``(B, N)`` bool, True for real interactions.
        timestamps_ms: ``(B, N)`` int64 event times (0 where padded).
        weights: ``(B, N)`` float32 event weights (0 where padded).
    """

    item_idx: torch.Tensor
    mask: torch.Tensor
    timestamps_ms: torch.Tensor
    weights: torch.Tensor

    def to(self, device: torch.device | str) -> HistoryBatch:
        """The same batch on ``device``."""
        return HistoryBatch(*(t.to(device) for t in (self.item_idx, self.mask, self.timestamps_ms, self.weights)))

    def rows(self, start: int, stop: int) -> HistoryBatch:
        """Users ``start:stop`` of the batch (views, on the batch's device)."""
        return HistoryBatch(*(t[start:stop] for t in (self.item_idx, self.mask, self.timestamps_ms, self.weights)))

    def __len__(self) -> int:
        return len(self.item_idx)


def pad_histories(item_idx: Sequence[np.ndarray], max_len: int, timestamps: Sequence[np.ndarray] | None = None,
                  weights: Sequence[np.ndarray] | None = None, pad_index: int = 0) -> HistoryBatch:
    """Keep each user's last ``max_len`` interactions and left-pad them into a :class:`HistoryBatch`.

    Args:
        item_idx: per user, item rows in chronological order (may be empty).
        max_len: N, the padded length.
        timestamps: per user, event times in ms aligned with ``item_idx`` (zeros when None).
        weights: per user, event weights aligned with ``item_idx`` (ones when None).
        pad_index: item row written at padded positions (any valid row; it is masked).
    """
    B = len(item_idx)
    items = np.full((B, max_len), pad_index, dtype=np.int64)
    mask = np.zeros((B, max_len), dtype=bool)
    ts = np.zeros((B, max_len), dtype=np.int64)
    w = np.zeros((B, max_len), dtype=np.float32)
    for b, seq in enumerate(item_idx):
        n = min(len(seq), max_len)
        if n == 0:
            continue
        items[b, -n:] = np.asarray(seq)[-n:]
        mask[b, -n:] = True
        if timestamps is not None:
            ts[b, -n:] = np.asarray(timestamps[b])[-n:]
        w[b, -n:] = 1.0 if weights is None else np.asarray(weights[b])[-n:]
    return HistoryBatch(torch.from_numpy(items), torch.from_numpy(mask), torch.from_numpy(ts), torch.from_numpy(w))
