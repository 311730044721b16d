"""Full-catalog evaluation of every variant on the held-out set (plain torch).

Every metric ranks the whole catalog with the user's training items removed
(:func:`tessera.models.ranking_metrics`, where a non-finite score is a miss); never sampled negatives.
Targets the user had already had are not evaluated (:meth:`tessera.train.examples.EvalSet.from_records`);
``repeat_targets`` counts them.

Example::

    metrics = evaluate_retrieval(model, eval_set, ks=(10, 50))
    # {'recall@10': ..., 'ndcg@10': ..., 'coverage@10': ..., 'mrr': ..., 'num_users': ..., 'repeat_targets': ...}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tessera.models import PopularityBaseline, ranking_metrics
from tessera.train.examples import EvalSet
from tessera.train.ranking import RankerModel
from tessera.train.retrieval import TwoTowerModel


def metrics_of_scores(scores: torch.Tensor, eval_set: EvalSet, ks: Sequence[int]) -> dict[str, float]:
    """Ranking metrics of a ``(U, I)`` score matrix against the held-out items, seen items excluded; with
    the number of targets left out as repeats."""
    out = ranking_metrics(scores, eval_set.test_items, ks=tuple(ks), exclude=eval_set.train_items)
    return {**{k: float(v) for k, v in out.items()}, "repeat_targets": eval_set.repeat_targets}


def evaluate_retrieval(model: TwoTowerModel, eval_set: EvalSet, ks: Sequence[int],
                       max_chunk_elements: int = 2**26) -> dict[str, float]:
    """Metrics of a retrieval model (put in eval mode for the call, then restored). The users are scored
    a chunk of at most ``max_chunk_elements`` scores at a time on the model's device, each chunk copied
    to the host as it is done (the whole matrix on a GPU ran out of its memory at scale)."""
    was_training = model.training
    model.eval()
    try:
        vecs = model.all_item_vectors()
        chunk = max(1, max_chunk_elements // max(1, vecs.shape[0]))
        history = eval_set.history
        scores = torch.cat([model.score(history.rows(s, s + chunk), vecs)[0].cpu()
                            for s in range(0, len(history), chunk)])
    finally:
        model.train(was_training)
    return metrics_of_scores(scores, eval_set, ks)


def evaluate_ranked(model: RankerModel, eval_set: EvalSet, ks: Sequence[int]) -> dict[str, float]:
    """Metrics of retrieval top-K re-ranked by the ranker."""
    was_training = model.training
    model.eval()
    try:
        scores = model.rerank(eval_set.history, exclude=eval_set.train_items)  # on the host
    finally:
        model.train(was_training)
    return metrics_of_scores(scores, eval_set, ks)


def evaluate_popularity(counts: np.ndarray, eval_set: EvalSet, ks: Sequence[int]) -> dict[str, float]:
    """Metrics of the popularity baseline (training interaction counts)."""
    pop = PopularityBaseline(counts)
    return metrics_of_scores(pop.scores(eval_set.num_users), eval_set, ks)


def quality_checks(results: dict[str, dict[str, float]], metric: str = "ndcg@10") -> dict[str, object]:
    """The issue's conditions, with margins: fused vs every single-modality / id variant present and the
    popularity baseline, and fused + ranker vs fused, on ``metric``.

    Returns:
        ``{"metric", "fused_margins": {variant: fused - variant}, "fused_beats_all": bool | None,
        "ranker_margin": float | None, "ranker_beats_retrieval": bool | None}``; ``fused_beats_all`` is
        None when no single-modality / id variant was trained (popularity alone is not the comparison).
    """
    fused = results["fused"][metric]
    margins = {v: fused - r[metric] for v, r in results.items() if v not in ("fused", "fused_ranked")}
    ranked = results.get("fused_ranked")
    ranker_margin = None if ranked is None else ranked[metric] - fused
    return {"metric": metric, "fused_margins": margins,
            # None when no single-modality / id variant was trained: nothing to beat is not a win
            "fused_beats_all": all(m > 0 for m in margins.values()) if set(margins) - {"popularity"} else None,
            "ranker_margin": ranker_margin,
            "ranker_beats_retrieval": None if ranker_margin is None else ranker_margin > 0}
