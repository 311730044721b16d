from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tessera.models import ranking_metrics

E = np.array([], dtype=np.int64)


def test_hand_computed_example():
    scores = np.array([[0.1, 0.9, 0.3, 0.5, 0.2],
                       [0.4, 0.3, 0.2, 0.1, 0.0],
                       [0.0, 0.0, 0.0, 9.0, 0.0]])
    targets = [np.array([2, 4]), np.array([0]), E]  # user 2 has no target: skipped
    exclude = [np.array([1]), E, E]
    m = ranking_metrics(scores, targets, ks=(2, 5), exclude=exclude)
    # user 0 ranks 3, 2, 4, 0 (1 excluded): one of two targets at rank 2; user 1 hits at rank 1.
    dcg0 = 1 / math.log2(3)
    ndcg0 = dcg0 / (1 + 1 / math.log2(3))
    assert m["num_users"] == 2
    assert m["recall@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["ndcg@2"] == pytest.approx((ndcg0 + 1.0) / 2)
    assert m["recall@5"] == pytest.approx(1.0)
    # user 0 at K=5: hits at ranks 2 and 3 of ideal ranks 1 and 2
    ndcg0_5 = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert m["ndcg@5"] == pytest.approx((ndcg0_5 + 1.0) / 2)
    assert m["mrr"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["coverage@2"] == pytest.approx(4 / 5)  # {3, 2} and {0, 1}; user 2's top-2 not counted


def test_torch_input_and_chunking_give_the_same_answer():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((7, 30))
    targets = [rng.choice(30, size=rng.integers(1, 4), replace=False) for _ in range(7)]
    exclude = [rng.choice(30, size=3, replace=False) for _ in range(7)]
    a = ranking_metrics(scores, targets, ks=(1, 5, 10), exclude=exclude)
    b = ranking_metrics(torch.tensor(scores, dtype=torch.float32), targets, ks=(10, 5, 1), exclude=exclude,
                        max_chunk_elements=60)  # 2 users per chunk
    assert a == pytest.approx(b)


def test_nan_never_ranks_first_and_nonfinite_targets_are_misses():
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[nan, 0.5, 0.1, 0.0],   # NaN column 0: target 1 must still be rank 1
                           [nan, nan, nan, nan],   # NaN row: a miss whatever the target
                           [nan, 0.2, nan, 0.1],   # the target itself is NaN: a miss even at K = 4
                           [inf, 0.3, 0.2, 0.1]])  # +inf is not finite either: target 1 is rank 1
    targets = [np.array([1]), np.array([0]), np.array([2]), np.array([1])]
    m = ranking_metrics(scores, targets, ks=(1, 4))
    assert m["recall@1"] == pytest.approx(2 / 4)
    assert m["recall@4"] == pytest.approx(2 / 4)
    assert m["mrr"] == pytest.approx(2 / 4)
    # Non-finite items are never counted as shown: item 0 is NaN or inf in every row.
    assert m["coverage@4"] == pytest.approx(3 / 4)
    # The per-user view: a NaN row alone scores zero everywhere.
    alone = ranking_metrics(scores[1:2], targets[1:2], ks=(4,))
    assert alone["recall@4"] == alone["ndcg@4"] == alone["mrr"] == alone["coverage@4"] == 0.0


def test_ties_are_broken_by_item_index():
    m = ranking_metrics(np.zeros((1, 4)), [np.array([2])], ks=(2, 3))
    assert m["recall@2"] == 0.0 and m["recall@3"] == 1.0
    assert m["mrr"] == pytest.approx(1 / 3)


def test_excluded_target_cannot_be_hit_and_shapes_are_checked():
    m = ranking_metrics(np.array([[3.0, 2.0, 1.0]]), [np.array([0])], ks=(3,), exclude=[np.array([0])])
    assert m["recall@3"] == 0.0 and m["mrr"] == 0.0
    with pytest.raises(ValueError):
        ranking_metrics(np.zeros((2, 3)), [np.array([0])])
