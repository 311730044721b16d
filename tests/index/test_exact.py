"""Exact search (the recall reference): order, ties, exclusion, padding; recall@k."""

import numpy as np
import pytest

from tessera.index import exact_search, l2_normalize, recall_at_k
from tessera.index.exact import as_float_matrix, prepare_queries


def test_matches_full_sort():
    rng = np.random.default_rng(0)
    x, q = rng.standard_normal((500, 16)).astype(np.float32), rng.standard_normal((7, 16)).astype(np.float32)
    rows, scores = exact_search(q, x, 10)
    expected = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
    assert np.array_equal(rows, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, expected, axis=1), rtol=1e-6)


def test_ties_go_to_the_lower_row_and_exclusion_applies():
    x = np.ones((6, 4), np.float32)
    q = np.ones((2, 4), np.float32)
    rows, _ = exact_search(q, x, 3, exclude_rows=[[0, 2], []])
    assert rows.tolist() == [[1, 3, 4], [0, 1, 2]]


def test_pads_when_too_few_rows_are_eligible():
    x = np.eye(3, dtype=np.float32)
    rows, scores = exact_search(x[:1], x, 5, exclude_rows=[[1]])
    assert rows.tolist() == [[0, 2, -1]] and np.isneginf(scores[0, 2])


def test_normalize_rejects_zero_rows():
    assert np.allclose(np.linalg.norm(l2_normalize(np.array([[3.0, 4.0]], np.float32)), axis=1), 1)
    with pytest.raises(ValueError, match="row 1 has zero norm"):
        l2_normalize(np.array([[1.0, 0.0], [0.0, 0.0]], np.float32))


def test_prepare_queries_is_the_two_checks_in_one():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 16)).astype(np.float32) * 3
    np.testing.assert_allclose(prepare_queries(x, 16, normalize=True), l2_normalize(as_float_matrix(x)), atol=1e-7)
    np.testing.assert_array_equal(prepare_queries(x, 16, normalize=False), x)
    # one query at a time (its own branch) gives the batch's bits exactly
    np.testing.assert_array_equal(np.concatenate([prepare_queries(r[None], 16, True) for r in x]),
                                  prepare_queries(x, 16, True))
    assert prepare_queries(np.empty((0, 16), np.float32), 16, True).shape == (0, 16)
    # finite values whose squares overflow float32 are not "non-finite": normalised in float64
    big = np.full((1, 16), 1e20, np.float32)
    np.testing.assert_allclose(prepare_queries(big, 16, True), np.full((1, 16), 0.25, np.float32), atol=1e-7)
    for bad, message in ((np.nan, "row 2 has non-finite values"), (np.inf, "row 2 has non-finite values"),
                         (-np.inf, "row 2 has non-finite values")):
        y = x.copy()
        y[2, 5] = bad
        for normalize in (True, False):
            with pytest.raises(ValueError, match=message):
                prepare_queries(y, 16, normalize)
            with pytest.raises(ValueError, match="row 0 has non-finite values"):
                prepare_queries(y[2:3], 16, normalize)
    y = x.copy()
    y[4] = 0
    with pytest.raises(ValueError, match="queries row 4 has zero norm"):
        prepare_queries(y, 16, True)
    with pytest.raises(ValueError, match="queries row 0 has zero norm"):
        prepare_queries(y[4:5], 16, True)
    assert np.array_equal(prepare_queries(y, 16, False), y)  # no normalisation: a zero row is allowed
    np.testing.assert_allclose(prepare_queries(big[:, :4].repeat(2, axis=0), 4, True), 0.5, atol=1e-7)
    with pytest.raises(ValueError, match="dimension 16, the index has 8"):
        prepare_queries(x, 8, True)
    with pytest.raises(ValueError, match="must be 2-D"):
        prepare_queries(x[0], 16, True)


def test_recall_at_k():
    assert recall_at_k([["a", "b"], ["c", "d"]], [["a", "x"], ["c", "d"]]) == 0.75
    assert recall_at_k([["a", "b", "c"]], [["c", "a", "z"]], k=2) == 0.5
    with pytest.raises(ValueError):
        recall_at_k([["a"]], [])
