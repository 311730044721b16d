"""Ranker inputs: dense features and training lists with hard and random negatives (torch / numpy).

Example::

    ex = build_ranker_examples(positives, retrieved_topk, num_items=10_000, num_hard=8, num_random=8,
                               rng=np.random.default_rng(0))
    ex.candidates   # (U, 17) item rows, the positive in column 0;  ex.labels: 1 then 0s
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def ranker_dense_features(retrieval_score: torch.Tensor, log_popularity: torch.Tensor,
                          candidate_modal: Mapping[str, torch.Tensor], candidate_present: Mapping[str, torch.Tensor],
                          history_modal: Mapping[str, torch.Tensor], history_present: Mapping[str, torch.Tensor],
                          modalities: Sequence[str]) -> torch.Tensor:
    """Dense features in :func:`tessera.models.ranker.dense_feature_names` order.

    Per modality ``m``: ``sim_m`` is the cosine between the candidate's ``m`` embedding and the
    normalised mean of the history's ``m`` embeddings, ``max_sim_m`` the cosine to the nearest single
    history item (a history of two tastes has a mean that sits between them: the nearest item keeps
    each), and ``has_m`` is 1 when both exist (else all three are 0). Raw encoder embeddings work, as
    do :meth:`ItemTower.project` vectors.

    Args:
        retrieval_score: ``(B, C)`` user-item score from the retrieval stage.
        log_popularity: ``(B, C)`` log interaction count (or share) of each candidate.
        candidate_modal: m -> ``(B, C, Dm)``; candidate_present: m -> ``(B, C)`` bool.
        history_modal: m -> ``(B, N, Dm)``; history_present: m -> ``(B, N)`` bool, already False
            at padded history positions.
        modalities: modality order.

    Returns:
        ``(B, C, 1 + 3 M + 1)`` float.
    """
    sims, maxs, has = [], [], []
    for m in modalities:
        hp = history_present[m].bool()  # (B, N)
        hv = F.normalize(torch.where(hp[..., None], history_modal[m], torch.zeros_like(history_modal[m])), dim=-1)
        mean = F.normalize(hv.sum(dim=1), dim=-1)  # (B, Dm); zero when no history item has m
        cp = candidate_present[m].bool()  # (B, C)
        cv = candidate_modal[m]
        cv = F.normalize(torch.where(cp[..., None], cv, torch.zeros_like(cv)), dim=-1)  # (B, C, Dm)
        both = cp & hp.any(dim=1, keepdim=True)  # (B, C)
        sim = torch.einsum("bcd,bd->bc", cv, mean)  # (B, C)
        sims.append(torch.where(both, sim, torch.zeros_like(sim)))
        pair = torch.einsum("bcd,bnd->bcn", cv, hv).masked_fill(~hp[:, None, :], -1.0)  # (B, C, N)
        maxs.append(torch.where(both, pair.amax(dim=2), torch.zeros_like(sim)))
        has.append(both.to(sim.dtype))
    cols = [retrieval_score.float()] + sims + maxs + has + [log_popularity.float()]
    return torch.stack(cols, dim=-1)  # (B, C, F)


@dataclass
class RankerExamples:
    """Ranking lists: ``candidates`` ``(U, 1 + H + R)`` int64 item rows, positive first; ``labels``
    the same shape, float32, 1 for the positive and 0 otherwise; ``is_hard`` marks retrieval negatives."""

    candidates: np.ndarray
    labels: np.ndarray
    is_hard: np.ndarray


def _duplicates_of_earlier(rows: np.ndarray) -> np.ndarray:
    """``(U, C)`` bool, True where the entry equals an entry to its left in the same row."""
    eq = rows[:, :, None] == rows[:, None, :]  # (U, C, C)
    return np.tril(eq, k=-1).any(axis=2)


def build_ranker_examples(positives: np.ndarray, retrieved: np.ndarray, num_items: int, num_hard: int,
                          num_random: int, rng: np.random.Generator, max_rounds: int = 100,
                          excluded: Sequence[np.ndarray] | None = None) -> RankerExamples:
    """Lists of one positive, ``num_hard`` negatives from retrieval and ``num_random`` uniform ones.

    Hard negatives are the best-ranked retrieved items that are not the positive (``-1`` entries in
    ``retrieved`` are padding); when too few remain the gap is filled with random items. Random
    negatives are uniform over the catalog less ``excluded`` (the items each user saw before: serving
    never offers them, so a list holding one teaches a choice the ranker never faces), never the
    positive and never repeated in a list. A user who has seen too much of the catalog to fill a list
    otherwise draws from the whole catalog.

    Args:
        positives: ``(U,)`` item row of each example's positive.
        retrieved: ``(U, K)`` retrieval top-K item rows, best first.
        num_items: catalog size.
        num_hard: H.
        num_random: R.
        rng: numpy random generator.
        max_rounds: resampling rounds before giving up on collisions.
        excluded: per user, the item rows its negatives must not be (None: none); sparse, so the cost
            is the seen items', not the catalog's.
    """
    positives = np.asarray(positives, dtype=np.int64)
    retrieved = np.asarray(retrieved, dtype=np.int64).reshape(len(positives), -1)
    U, H, R = len(positives), num_hard, num_random
    if num_items < 1 + H + R:
        raise ValueError(f"a catalog of {num_items} items cannot fill lists of {1 + H + R} distinct items")
    ok = (retrieved >= 0) & (retrieved != positives[:, None]) & ~_duplicates_of_earlier(retrieved)  # (U, K)
    is_excluded = None
    if excluded is not None:
        if len(excluded) != U:
            raise ValueError(f"excluded holds {len(excluded)} users' items, not {U}")
        # (user, item) as one sorted int64 key each: membership of any (U, C) block by one searchsorted
        keys = np.unique(np.concatenate([u * num_items + np.asarray(rows, np.int64)
                                         for u, rows in enumerate(excluded)] + [np.zeros(0, np.int64)]))
        seen_count = np.bincount(keys // num_items, minlength=U)

        def is_excluded(block: np.ndarray, users: np.ndarray = np.arange(U)) -> np.ndarray:
            k = users[:, None] * num_items + block
            at = np.searchsorted(keys, k).clip(max=max(len(keys) - 1, 0))
            return (keys[at] == k) if len(keys) else np.zeros(block.shape, bool)

        ok &= ~is_excluded(retrieved.clip(0))  # a top-K of fewer unseen items than K
    order = np.argsort(~ok, axis=1, kind="stable")[:, :H]  # usable ones first, rank order kept
    hard = np.take_along_axis(retrieved, order, axis=1)
    hard_ok = np.take_along_axis(ok, order, axis=1)
    if hard.shape[1] < H:  # K < H
        pad = H - hard.shape[1]
        hard = np.concatenate([hard, np.zeros((U, pad), dtype=np.int64)], axis=1)
        hard_ok = np.concatenate([hard_ok, np.zeros((U, pad), dtype=bool)], axis=1)
    rows = np.concatenate([positives[:, None], hard, rng.integers(0, num_items, size=(U, R))], axis=1)
    fixed = np.concatenate([np.ones((U, 1), bool), hard_ok, np.zeros((U, R), bool)], axis=1)
    C = rows.shape[1]
    earlier_or_fixed = np.tril(np.ones((C, C), bool), k=-1)[None] | fixed[:, None, :]  # (U, C, C)
    earlier_or_fixed &= ~np.eye(C, dtype=bool)[None]
    applies = np.zeros(U, bool)
    if is_excluded is not None:
        # Room for the draws: the unseen items besides the positive and the hard negatives; a user with
        # too little draws from the whole catalog.
        room = num_items - seen_count - (~is_excluded(rows) & fixed).sum(axis=1)
        applies = room >= (~fixed).sum(axis=1)
    bad = ~fixed
    for _ in range(max_rounds):
        if not bad.any():
            break
        rows[bad] = rng.integers(0, num_items, size=int(bad.sum()))
        # A draw is bad when it repeats a fixed entry (positive, hard) or an earlier draw, or is excluded.
        clash = ((rows[:, :, None] == rows[:, None, :]) & earlier_or_fixed).any(axis=2)  # (U, C)
        if applies.any():
            clash |= is_excluded(rows) & applies[:, None]
        bad = clash & ~fixed
    for u in np.flatnonzero(bad.any(axis=1)):  # rejection keeps failing (a tight catalog): draw from what is left
        allowed = np.ones(num_items, bool)
        if applies[u]:
            allowed[np.asarray(excluded[u], np.int64)] = False
        allowed[rows[u][~bad[u]]] = False
        rows[u, bad[u]] = rng.choice(np.flatnonzero(allowed), size=int(bad[u].sum()), replace=False)
    labels = np.zeros(rows.shape, dtype=np.float32)
    labels[:, 0] = 1.0
    is_hard = np.concatenate([np.zeros((U, 1), bool), hard_ok, np.zeros((U, R), bool)], axis=1)
    return RankerExamples(candidates=rows, labels=labels, is_hard=is_hard)
