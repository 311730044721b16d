"""pad_right: one micro-batch of variable-length items as a padded array, its mask and lengths."""

from __future__ import annotations

import numpy as np

from tessera.encoders.padding import pad_right


def test_rows_are_right_padded_in_order_with_their_mask_and_lengths():
    items = [np.array([5, 6, 7], np.int32), np.array([8], np.int32), np.array([], np.int32), np.arange(1, 5)]
    values, mask, lengths = pad_right(items, width=4, pad_value=-1, dtype=np.int64)
    assert values.dtype == np.int64 and values.tolist() == [[5, 6, 7, -1], [8, -1, -1, -1], [-1] * 4, [1, 2, 3, 4]]
    assert mask.tolist() == [[True] * 3 + [False], [True] + [False] * 3, [False] * 4, [True] * 4]
    assert lengths.tolist() == [3, 1, 0, 4]


def test_longer_items_are_cut_to_the_width():
    wave = np.linspace(-1, 1, 10, dtype=np.float64)
    values, mask, lengths = pad_right([wave, wave[:2]], width=6, pad_value=0.0, dtype=np.float32)
    assert values.dtype == np.float32 and lengths.tolist() == [6, 2]
    np.testing.assert_array_equal(values[0], wave[:6].astype(np.float32))
    np.testing.assert_array_equal(values[1], np.array([wave[0], wave[1], 0, 0, 0, 0], np.float32))
    assert mask.sum() == 8


def test_no_items():
    values, mask, lengths = pad_right([], width=3, pad_value=0, dtype=np.int64)
    assert values.shape == mask.shape == (0, 3) and lengths.shape == (0,)
