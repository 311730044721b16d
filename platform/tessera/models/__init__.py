"""Torch models for retrieval and ranking (no Ray here; the Train loop imports these).

* :class:`ItemTower` fuses per-modality encoder embeddings (+ optional hashed id) into item vectors.
* :class:`UserTower` turns a user's recent item vectors, with time gaps, into a user vector.
* :class:`Ranker` scores (history, candidate) pairs, DIN-style, with dense features.
* :mod:`tessera.models.losses`: cross-modal InfoNCE, logQ-corrected in-batch softmax, ranker losses.
* :mod:`tessera.models.metrics` / :mod:`tessera.models.evaluation`: offline evaluation.

Every model saves as ``config.json`` + weights and loads back with ``Model.load(dir)``.
"""

from tessera.models.evaluation import PopularityBaseline, TimeSplit, group_by_user, time_split
from tessera.models.history import HistoryBatch, pad_histories
from tessera.models.item_tower import ItemTower, ItemTowerConfig, hash_item_ids
from tessera.models.losses import (
    cross_modal_infonce,
    info_nce,
    listwise_softmax_loss,
    log_sampling_probability,
    logq_correct,
    ranker_bce_loss,
    sampled_softmax_loss,
)
from tessera.models.metrics import ranking_metrics
from tessera.models.ranker import Ranker, RankerConfig, dense_feature_names
from tessera.models.ranker_data import RankerExamples, build_ranker_examples, ranker_dense_features
from tessera.models.user_tower import UserTower, UserTowerConfig

__all__ = [
    "HistoryBatch", "ItemTower", "ItemTowerConfig", "PopularityBaseline", "Ranker", "RankerConfig",
    "RankerExamples", "TimeSplit", "UserTower", "UserTowerConfig", "build_ranker_examples",
    "cross_modal_infonce", "dense_feature_names", "group_by_user", "hash_item_ids", "info_nce",
    "listwise_softmax_loss", "log_sampling_probability", "logq_correct", "pad_histories",
    "ranker_bce_loss", "ranker_dense_features", "ranking_metrics", "sampled_softmax_loss", "time_split",
]
