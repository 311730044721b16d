from __future__ import annotations

import numpy as np

from tessera.models import pad_histories


def test_left_padding_and_truncation():
    batch = pad_histories([np.array([4, 7]), np.array([], dtype=np.int64), np.array([1, 2, 3, 4])], max_len=3,
                          timestamps=[np.array([10, 20]), np.array([]), np.array([1, 2, 3, 4])],
                          weights=[np.array([1.0, 2.0]), np.array([]), np.array([1, 1, 1, 3.0])], pad_index=0)
    assert batch.item_idx.tolist() == [[0, 4, 7], [0, 0, 0], [2, 3, 4]]
    assert batch.mask.tolist() == [[False, True, True], [False, False, False], [True, True, True]]
    assert batch.timestamps_ms.tolist() == [[0, 10, 20], [0, 0, 0], [2, 3, 4]]
    assert batch.weights.tolist() == [[0, 1, 2], [0, 0, 0], [1, 1, 3]]
    assert pad_histories([np.array([5])], max_len=2).weights.tolist() == [[0, 1]]
