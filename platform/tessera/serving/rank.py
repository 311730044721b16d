"""The ranking side of one version: re-scores retrieval candidates with the bundle's ranker.

The features are built exactly as in training (:func:`tessera.models.ranker_dense_features`): the
retrieval score, per modality the cosine between the candidate's encoder embedding and the
history's mean and whether both exist, and ``log1p`` of the item's training interactions (each
user's last ``max_examples_per_user`` counted; the bundle's ``item_popularity.parquet``). The final
score follows the bundle manifest's ``ranker_features.score``: ``retrieval_score / temperature +
ranker_logit`` for a residual ranker. A bundle whose ranker was not trained keeps the retrieval order.

Cold requests (no usable history) get the most popular items instead, minus excluded ones.

Example::

    rk = RankerCore.load(storage, ref)
    out = rk.rank([RankInput(history_rows, cand_ids, cand_scores, k=10, exclude_rows=seen)])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tessera.serving.version import ItemVectors, VersionError, VersionRef, read_popularity
from tessera.storage import Storage


@dataclass
class RankInput:
    """One request for the ranker: ``candidate_ids`` / ``retrieval_scores`` best first (empty when cold)."""

    history_rows: np.ndarray
    candidate_ids: list[str]
    retrieval_scores: np.ndarray
    k: int
    exclude_rows: np.ndarray
    cold: bool = False


@dataclass
class RankOutput:
    ids: list[str]
    scores: np.ndarray
    retrieval_scores: np.ndarray | None
    ranked: bool


class RankerCore:
    """Re-scoring for one version (no Ray). Thread-safe for concurrent calls."""

    def __init__(self, ref: VersionRef, items: ItemVectors, catalog, ranker, popularity: np.ndarray):
        if not np.array_equal(catalog.item_ids, items.ids):
            raise VersionError(f"the embedding run {ref.embedding_run} and the item vectors of {ref.index_uri} "
                               f"hold different items")
        self.ref, self.items, self.catalog, self.ranker = ref, items, catalog, ranker.eval()
        features = ref.bundle_manifest.get("ranker_features", {})
        self.trained = bool(features.get("trained", False))
        self.residual = str(features.get("score", "")).startswith("retrieval_score")
        self.temperature = float(features.get("temperature", 1.0))
        self.candidates = int(features.get("candidates", 50))
        self.popularity = popularity
        self.log_popularity = np.log1p(popularity).astype(np.float32)
        self.popular_order = np.lexsort((np.arange(len(popularity)), -popularity))  # most popular first
        self.popular_order = self.popular_order[items.indexed[self.popular_order]]
        expected = list(ranker.config.dense_features)
        from tessera.models import dense_feature_names

        built = dense_feature_names(catalog.modalities)
        if self.trained and expected != built:
            raise VersionError(f"the ranker of {ref.model_uri} expects features {expected}; for the embedding "
                               f"run's modalities {catalog.modalities} this Tessera builds {built} (a bundle "
                               "trained by another Tessera version or on other modalities: retrain it)")

    @classmethod
    def load(cls, storage: Storage, ref: VersionRef) -> RankerCore:
        from tessera.models.bundle import ModelBundle
        from tessera.train.catalog import ItemCatalog

        items = ItemVectors.load(storage, ref)
        catalog = ItemCatalog.load(storage, ref.embedding_run)
        bundle = ModelBundle.load(storage, ref.model_uri)
        return cls(ref, items, catalog, bundle.ranker, read_popularity(storage, ref, items))

    def popular(self, k: int, exclude_rows: np.ndarray) -> RankOutput:
        order = self.popular_order
        if len(exclude_rows):
            order = order[~np.isin(order, exclude_rows)]
        top = order[:k]
        return RankOutput([str(x) for x in self.items.ids[top]], self.popularity[top].astype(np.float32), None, False)

    def rank(self, inputs: list[RankInput]) -> list[RankOutput]:
        """One output per input, in order; one ranker forward pass for every warm request."""
        import torch

        from tessera.models import ranker_dense_features
        from tessera.models.history import pad_histories

        out: list[RankOutput | None] = [None] * len(inputs)
        warm = []
        for i, x in enumerate(inputs):
            if x.cold:
                out[i] = self.popular(x.k, x.exclude_rows)
            elif not self.trained or len(x.candidate_ids) == 0:
                out[i] = RankOutput(list(x.candidate_ids[:x.k]), x.retrieval_scores[:x.k].astype(np.float32),
                                    x.retrieval_scores[:x.k].astype(np.float32), False)
            else:
                warm.append(i)
        if not warm:
            return out  # type: ignore[return-value]
        C = max(len(inputs[i].candidate_ids) for i in warm)
        cand = np.zeros((len(warm), C), np.int64)
        valid = np.zeros((len(warm), C), bool)
        retrieval = np.full((len(warm), C), -1.0, np.float32)
        for j, i in enumerate(warm):
            rows = self.items.rows(inputs[i].candidate_ids)
            n = len(rows)
            cand[j, :n], valid[j, :n] = np.maximum(rows, 0), rows >= 0
            retrieval[j, :n] = inputs[i].retrieval_scores
        max_hist = self.ranker.config.max_history
        hist = pad_histories([inputs[i].history_rows for i in warm], max_hist)
        cand_t = torch.from_numpy(cand)
        fused = torch.from_numpy(self.items.fused)
        cand_modal, cand_present = self.catalog.features(cand_t)
        hist_modal, hist_present = self.catalog.features(hist.item_idx)
        hist_present = {m: p & hist.mask for m, p in hist_present.items()}
        retrieval_t = torch.from_numpy(retrieval)
        with torch.inference_mode():
            dense = ranker_dense_features(retrieval_t, torch.from_numpy(self.log_popularity)[cand_t], cand_modal,
                                          cand_present, hist_modal, hist_present, self.catalog.modalities)
            logits = self.ranker(fused[hist.item_idx], hist.mask, fused[cand_t], dense)  # (B, C)
            scores = retrieval_t / self.temperature + logits if self.residual else logits
        scores = scores.numpy()
        scores[~valid] = -np.inf
        for j, i in enumerate(warm):
            order = np.argsort(-scores[j], kind="stable")[:inputs[i].k]
            order = order[np.isfinite(scores[j, order])]
            out[i] = RankOutput([inputs[i].candidate_ids[c] for c in order], scores[j, order].astype(np.float32),
                                retrieval[j, order], True)
        return out  # type: ignore[return-value]
