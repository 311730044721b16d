"""Full-catalog ranking metrics from a ``(users, items)`` score matrix and held-out targets.

For each user with at least one target, items in ``exclude`` (typically the training history) are
removed, the rest are ranked by score, and:

* ``recall@K`` = |top-K ∩ targets| / |targets|
* ``ndcg@K``  = DCG@K / IDCG@K with binary gains, ``DCG = sum_hits 1 / log2(rank + 1)`` and the ideal
  DCG over ``min(|targets|, K)`` hits (Järvelin & Kekäläinen 2002)
* ``mrr``     = 1 / rank of the best-ranked target over the whole catalog (0 when none is finite)
* ``coverage@K`` = distinct items in any evaluated user's top-K / catalog size

are averaged over those users. A non-finite score (NaN, ±inf) is a miss: it is replaced by ``-inf``
before the top-K, so a NaN never ranks first, and a target with a non-finite score never counts as a
hit; such items are not counted in the coverage either. Ties are broken by item index (lower first).
Targets that are also excluded cannot be hit.

Example::

    ranking_metrics(scores, targets=[np.array([3]), np.array([0, 5])], ks=(10,),
                    exclude=[np.array([1, 2]), np.array([])])
    # {'recall@10': ..., 'ndcg@10': ..., 'coverage@10': ..., 'mrr': ..., 'num_users': 2}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _as_tensor(scores: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(scores).detach().to("cpu")
    return t if t.is_floating_point() else t.double()


def ranking_metrics(scores: np.ndarray | torch.Tensor, targets: Sequence[np.ndarray], ks: Sequence[int] = (10,),
                    exclude: Sequence[np.ndarray] | None = None, max_chunk_elements: int = 2**24) -> dict[str, float]:
    """Recall@K, NDCG@K, coverage@K for each K in ``ks`` and full-catalog MRR; see the module docstring.

    Args:
        scores: ``(U, I)`` higher is better; row ``u`` belongs to ``targets[u]``.
        targets: per user, held-out item rows (users with none are skipped).
        ks: cut-offs.
        exclude: per user, item rows removed from the ranking (e.g. already seen), or None.
        max_chunk_elements: bound on ``users_per_chunk * I``; peak memory is about 40 bytes per element
            (a full sort per user is needed for the full-catalog MRR).

    Returns:
        ``{"recall@K", "ndcg@K", "coverage@K" per K, "mrr", "num_users"}``.
    """
    scores = _as_tensor(scores)
    U, n_items = scores.shape
    if len(targets) != U or (exclude is not None and len(exclude) != U):
        raise ValueError("targets and exclude need one entry per score row")
    ks = sorted({int(k) for k in ks})
    kmax = min(max(ks), n_items)
    recall = {k: 0.0 for k in ks}
    ndcg = {k: 0.0 for k in ks}
    covered = {k: torch.zeros(n_items, dtype=torch.bool) for k in ks}
    discount = 1.0 / torch.log2(torch.arange(2, kmax + 2, dtype=torch.float64))  # (kmax,)
    mrr, n_users = 0.0, 0
    chunk_size = max(1, max_chunk_elements // max(n_items, 1))
    for start in range(0, U, chunk_size):
        block = scores[start:start + chunk_size].clone()  # (b, n_items)
        b = block.shape[0]
        finite = torch.isfinite(block)
        block[~finite] = float("-inf")
        tgt = torch.zeros(b, n_items, dtype=torch.bool)
        for r in range(b):
            t = np.asarray(targets[start + r], dtype=np.int64)
            tgt[r, torch.tensor(t)] = True  # a copy: t may be a read-only view
            if exclude is not None and len(exclude[start + r]):
                e = torch.tensor(np.asarray(exclude[start + r], dtype=np.int64))
                block[r, e] = float("-inf")
                finite[r, e] = False
        has = tgt.any(dim=1)  # (b,)
        n_target = tgt.sum(dim=1).double()  # (b,)
        order = torch.sort(block, dim=1, descending=True, stable=True).indices  # (b, n_items)
        top = order[:, :kmax]  # (b, kmax)
        hit = (tgt.gather(1, top) & finite.gather(1, top)).double()  # (b, kmax)
        top_finite = finite.gather(1, top)
        for k in ks:
            kk = min(k, n_items)
            hits_k = hit[:, :kk]
            recall[k] += (hits_k.sum(1)[has] / n_target[has]).sum().item()
            ideal = torch.cumsum(discount[:kk], 0)[(n_target.clamp(max=kk) - 1).clamp(min=0).long()]  # (b,)
            ndcg[k] += ((hits_k * discount[:kk]).sum(1)[has] / ideal[has]).sum().item()
            shown = top[:, :kk][top_finite[:, :kk] & has[:, None]]
            covered[k][shown] = True
        # Full-catalog 0-based rank of every item, then the best finite target per user.
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n_items).expand(b, n_items))  # (b, n_items)
        best = torch.where(tgt & finite, rank, torch.full_like(rank, n_items)).amin(dim=1)  # (b,)
        rr = torch.where(best < n_items, 1.0 / (best + 1).double(), torch.zeros(b, dtype=torch.float64))
        mrr += rr[has].sum().item()
        n_users += int(has.sum())
    out: dict[str, float] = {}
    denom = max(n_users, 1)
    for k in ks:
        out[f"recall@{k}"] = recall[k] / denom
        out[f"ndcg@{k}"] = ndcg[k] / denom
        out[f"coverage@{k}"] = covered[k].sum().item() / n_items
    out["mrr"] = mrr / denom
    out["num_users"] = n_users
    return out
