"""Exact (brute-force) dot-product search in numpy, vector checks, and recall@k.

Exact search serves small shards and is the reference for every recall figure. Ties in score are
broken by the lower row index, so results are reproducible.

Example::

    rows, scores = exact_search(queries, vectors, k=10)           # (Q, 10) each
    recall = recall_at_k(approx_ids, [[ids[r] for r in row] for row in rows])
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# Largest (queries x points) score block computed at once: 16M float32 = 64 MiB.
_MAX_BLOCK = 1 << 24


def _item(row: int, ids: Sequence[str] | None) -> str:
    """`` (item <id>)`` of ``row`` when ``ids`` names the rows, else ''."""
    return f" (item {ids[row]!r})" if ids is not None and row < len(ids) else ""


def as_float_matrix(x, name: str = "vectors", dim: int | None = None, ids: Sequence[str] | None = None) -> np.ndarray:
    """``x`` as a C-contiguous (N, D) float32 array; raises ``ValueError`` on bad shape or non-finite values.

    Args:
        x: array-like of shape (N, D).
        name: what to call it in error messages.
        dim: the D it must have, if known.
        ids: the rows' item ids, named in a bad row's error (a shard's own row number means nothing to a
            caller who split the catalog by hash).
    """
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} have dimension {arr.shape[1]}, the index has {dim}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(f"{name} row {row} has non-finite values ({int(bad.sum())} such rows){_item(row, ids)}")
    return arr


def l2_normalize(x: np.ndarray, name: str = "vectors", ids: Sequence[str] | None = None) -> np.ndarray:
    """Rows scaled to unit L2 norm (a new float32 array); a zero row raises ``ValueError``.

    Args:
        x: (N, D) float32.
        name: what to call it in error messages.
        ids: the rows' item ids, named in a zero row's error.
    """
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    zero = norms[:, 0] == 0
    if zero.any():
        row = int(np.argmax(zero))
        raise ValueError(f"{name} row {row} has zero norm ({int(zero.sum())} such rows){_item(row, ids)}")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def prepare_queries(x, dim: int, normalize: bool, name: str = "queries") -> np.ndarray:
    """``as_float_matrix`` then (when ``normalize``) ``l2_normalize``, with the same errors, in fewer steps.

    The per-call path of a search: one squared-norm pass answers both "is every value finite" (a NaN or
    infinite value makes its row's sum non-finite) and "what is each row's norm", so a single query
    costs three numpy passes instead of the two checks' separate ones. Only when a sum is not finite
    (or zero) are the queries looked at again, to tell a bad value from a sum that overflowed.
    """
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != dim:
        as_float_matrix(arr, name, dim)  # raises, naming the shape
    if arr.shape[0] == 0:
        return arr
    sq = np.einsum("ij,ij->i", arr, arr)  # (Q,) squared norms
    if arr.shape[0] == 1:  # one query (the serving path): Python floats, one numpy call fewer each
        s = float(sq[0])
        if s < math.inf and (s > 0 or not normalize):  # False for a NaN too
            # float32 division by the correctly rounded root: the same bits as the batch branch below
            return arr / np.float32(math.sqrt(s)) if normalize else arr
    elif sq.max() < np.inf and (sq.min() > 0 or not normalize):
        return arr / np.sqrt(sq)[:, None] if normalize else arr
    arr = as_float_matrix(arr, name, dim)  # raises on a non-finite value
    if not normalize:
        return arr
    sq = np.einsum("ij,ij->i", arr.astype(np.float64), arr.astype(np.float64))  # finite, but float32 overflowed
    if not sq.all():
        zero = sq == 0
        raise ValueError(f"{name} row {int(np.argmax(zero))} has zero norm ({int(zero.sum())} such rows)")
    return (arr / np.sqrt(sq)[:, None]).astype(np.float32)


def top_k_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` columns of each row of ``scores`` (Q, N), best first, ties to the lower column.

    Returns ``(columns int64 (Q, min(k, N)), scores float32 (Q, min(k, N)))``; ``-inf`` scores
    (masked entries) come back as column ``-1``.
    """
    q, n = scores.shape
    kk = min(k, n)
    if kk == 0:
        return np.empty((q, 0), np.int64), np.empty((q, 0), np.float32)
    if kk < n:
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]  # (Q, kk), unordered
        # argpartition may cut a tie at the boundary arbitrarily: take every column tying the k-th score.
        kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)  # (Q, 1)
        if int((scores >= kth).sum(axis=1).max()) > kk:
            part = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
    else:
        part = np.broadcast_to(np.arange(n), (q, n))
    sub = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -sub), axis=1)  # by score desc, then column asc
    cols = np.take_along_axis(part, order, axis=1).astype(np.int64)
    best = np.take_along_axis(sub, order, axis=1).astype(np.float32)
    cols[~np.isfinite(best)] = -1
    return cols, best


def exact_search(queries: np.ndarray, vectors: np.ndarray, k: int,
                 exclude_rows: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` rows of ``vectors`` by dot product with each query.

    Args:
        queries: (Q, D) float32.
        vectors: (N, D) float32.
        k: neighbours per query.
        exclude_rows: per query, row indices that must not be returned.

    Returns:
        ``(rows int64 (Q, min(k, N)), scores float32 (Q, min(k, N)))``; row ``-1`` / score ``-inf``
        pad a query with fewer than ``k`` eligible rows.

    Example::

        rows, scores = exact_search(q, db, k=10, exclude_rows=[[3, 7]] * len(q))
    """
    q, n = queries.shape[0], vectors.shape[0]
    if exclude_rows is not None and len(exclude_rows) != q:
        raise ValueError(f"exclude_rows has {len(exclude_rows)} entries for {q} queries")
    kk = min(k, n)
    rows_out = np.full((q, kk), -1, np.int64)
    scores_out = np.full((q, kk), -np.inf, np.float32)
    step = max(1, _MAX_BLOCK // max(n, 1))
    for start in range(0, q, step):
        stop = min(q, start + step)
        scores = queries[start:stop] @ vectors.T  # (B, N)
        if exclude_rows is not None:
            for i, rows in enumerate(exclude_rows[start:stop]):
                if len(rows):
                    scores[i, np.asarray(rows, dtype=np.int64)] = -np.inf
        rows_out[start:stop], scores_out[start:stop] = top_k_rows(scores, kk)
    return rows_out, scores_out


def recall_at_k(approx_ids: Sequence[Sequence], exact_ids: Sequence[Sequence], k: int | None = None) -> float:
    """Mean over queries of ``|approx[:k] & exact[:k]| / |exact[:k]|`` (queries with no exact result skipped).

    Args:
        approx_ids: per query, the ids an approximate search returned (best first).
        exact_ids: per query, the true nearest ids (best first).
        k: cut-off; None uses each query's full exact list.

    Example::

        recall_at_k([["a", "b"]], [["a", "c"]])  # 0.5
    """
    if len(approx_ids) != len(exact_ids):
        raise ValueError(f"{len(approx_ids)} approximate result lists for {len(exact_ids)} exact ones")
    total, counted = 0.0, 0
    for approx, exact in zip(approx_ids, exact_ids, strict=True):
        truth = set(list(exact)[:k] if k is not None else exact)
        if not truth:
            continue
        found = set(list(approx)[:k] if k is not None else approx)
        total += len(truth & found) / len(truth)
        counted += 1
    return total / counted if counted else 1.0
