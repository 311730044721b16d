"""Training losses: cross-modal InfoNCE, logQ-corrected in-batch softmax, ranker BCE and listwise.

Example::

    u, v = user_tower(...), item_tower(...)                      # (B, D) each, row i is a positive
    log_q = log_sampling_probability(item_counts)[batch_items]   # (B,)
    loss = sampled_softmax_loss(u, v, log_q, item_ids=batch_items, temperature=0.05)
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F


def _duplicate_mask(ids: torch.Tensor) -> torch.Tensor:
    """``(B, B)`` bool, True at off-diagonal pairs holding the same id (accidental positives)."""
    same = ids[:, None] == ids[None, :]  # (B, B)
    return same & ~torch.eye(len(ids), dtype=torch.bool, device=ids.device)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (van den Oord et al. 2018; in the two-way form of CLIP, Radford et al. 2021).

    ``L = (CE(a b^T / t, I) + CE(b a^T / t, I)) / 2``: row ``i`` of ``a`` and of ``b`` are the positive
    pair, every other row is a negative, except rows with the same ``ids`` (masked).

    Args:
        a, b: ``(B, D)`` unit vectors.
        temperature: softmax temperature.
        ids: optional ``(B,)`` item ids; duplicates are not used as negatives.
    """
    logits = a @ b.T / temperature  # (B, B)
    if ids is not None:
        logits = logits.masked_fill(_duplicate_mask(ids), float("-inf"))
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def cross_modal_infonce(vectors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], temperature: float = 0.07,
                        ids: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE between single-modality views of the same items, over every pair of modalities.

    For each modality pair, only items present in both take part; pairs with fewer than two such
    items are skipped. The result is the mean over the pairs used (0 when none; still connected to
    the graph, so DDP sees every parameter receive a gradient).

    Args:
        vectors: modality -> (``(B, D)`` unit vectors, ``(B,)`` bool present), as returned by
            :meth:`ItemTower.modality_vectors`.
        temperature: softmax temperature.
        ids: optional ``(B,)`` item ids to mask duplicate items in the batch.

    Example::

        loss = cross_modal_infonce(tower.modality_vectors(embs, masks), temperature=0.07)
    """
    losses = []
    for (va, pa), (vb, pb) in itertools.combinations(vectors.values(), 2):
        both = pa & pb  # (B,)
        if int(both.sum()) < 2:
            continue
        losses.append(info_nce(va[both], vb[both], temperature, None if ids is None else ids[both]))
    if not losses:
        if not vectors:
            raise ValueError("cross_modal_infonce needs at least one modality")
        return torch.stack([v.sum() for v, _ in vectors.values()]).sum() * 0.0
    return torch.stack(losses).mean()


def log_sampling_probability(counts: np.ndarray | torch.Tensor, smoothing: float = 1.0) -> torch.Tensor:
    """``log q_j`` with ``q_j = (c_j + s) / sum(c + s)``: the chance a batch example's item is ``j``.

    With in-batch negatives an item appears as a negative as often as it is a positive, so its
    interaction share is its sampling probability (Yi et al. 2019 estimate it by streaming; with the
    counts known offline they are used directly).

    Args:
        counts: ``(I,)`` training interactions per item.
        smoothing: added to every count, so unseen items have a finite log q.
    """
    c = torch.as_tensor(counts, dtype=torch.float64) + smoothing
    return torch.log(c / c.sum()).float()


def logq_correct(logits: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``s_c(x_i, y_j) = s(x_i, y_j) - log(q_j)`` (Yi et al. 2019, "Sampling-Bias-Corrected Neural
    Modeling for Large Corpus Item Recommendations", eq. 3).

    Args:
        logits: ``(B, B')`` user-by-item scores.
        log_q: ``(B',)`` log sampling probability of each column's item.
    """
    return logits - log_q[None, :]


def sampled_softmax_loss(user: torch.Tensor, item: torch.Tensor, log_q: torch.Tensor | None = None,
                         temperature: float = 0.05, item_ids: torch.Tensor | None = None,
                         weights: torch.Tensor | None = None) -> torch.Tensor:
    """In-batch sampled softmax with logQ correction (Yi et al. 2019).

    ``logits[i, j] = <u_i, v_j> / temperature - log q_j``; the target of row ``i`` is column ``i``.
    Columns ``j != i`` holding the same item as column ``i`` are accidental positives and are masked.

    Args:
        user: ``(B, D)`` user vectors.
        item: ``(B, D)`` vectors of each user's positive item.
        log_q: ``(B,)`` log sampling probability of each positive item (no correction when None).
        temperature: softmax temperature.
        item_ids: ``(B,)`` item ids (or catalog rows) used to find duplicates.
        weights: ``(B,)`` per-example weights (e.g. event weights); a weighted mean is returned.
    """
    logits = user @ item.T / temperature  # (B, B)
    if log_q is not None:
        logits = logq_correct(logits, log_q)
    if item_ids is not None:
        logits = logits.masked_fill(_duplicate_mask(item_ids), float("-inf"))
    ce = F.cross_entropy(logits, torch.arange(len(user), device=user.device), reduction="none")  # (B,)
    if weights is None:
        return ce.mean()
    return (ce * weights).sum() / weights.sum().clamp(min=1e-12)


def ranker_bce_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pointwise binary cross-entropy over ``(B, C)`` candidate logits, ignoring masked entries."""
    loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")  # (B, C)
    if mask is None:
        return loss.mean()
    m = mask.to(loss.dtype)
    return (loss * m).sum() / m.sum().clamp(min=1.0)


def listwise_softmax_loss(logits: torch.Tensor, labels: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy per list (ListNet top-1, Cao et al. 2007) against normalised labels.

    Args:
        logits: ``(B, C)`` candidate logits.
        labels: ``(B, C)`` non-negative relevance; lists without any positive are skipped.
        mask: ``(B, C)`` bool, False for padded candidates.
    """
    labels = labels.to(logits.dtype)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
        labels = labels * mask
    total = labels.sum(dim=1)  # (B,)
    keep = total > 0
    if not keep.any():
        return logits.sum() * 0.0
    target = labels[keep] / total[keep, None]  # (B', C)
    logp = F.log_softmax(logits[keep], dim=1)
    return -(target * torch.where(target > 0, logp, torch.zeros_like(logp))).sum(dim=1).mean()
