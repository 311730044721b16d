from __future__ import annotations

import numpy as np
import pytest
import torch

from tessera.models import build_ranker_examples, dense_feature_names, ranker_dense_features


def test_examples_positive_first_hard_then_random():
    rng = np.random.default_rng(0)
    positives = np.array([5, 9, 2])
    retrieved = np.array([[5, 1, 1, 7, 8],     # positive and a duplicate are skipped
                          [3, 4, 9, 6, -1],
                          [2, -1, -1, -1, -1]])  # too few retrieved: random fill
    ex = build_ranker_examples(positives, retrieved, num_items=50, num_hard=3, num_random=4, rng=rng)
    assert ex.candidates.shape == ex.labels.shape == (3, 8)
    assert (ex.candidates[:, 0] == positives).all()
    assert (ex.labels[:, 0] == 1).all() and (ex.labels[:, 1:] == 0).all()
    assert ex.candidates[0, 1:4].tolist() == [1, 7, 8]
    assert ex.candidates[1, 1:4].tolist() == [3, 4, 6]
    assert ex.is_hard[0, 1:4].all() and not ex.is_hard[2, 1:].any()
    for row in ex.candidates:
        assert len(set(row.tolist())) == len(row)  # distinct, positive never repeated as negative
        assert ((row >= 0) & (row < 50)).all()


def test_examples_small_catalog_is_refused():
    with pytest.raises(ValueError):
        build_ranker_examples(np.array([0]), np.array([[1]]), num_items=3, num_hard=1, num_random=2,
                              rng=np.random.default_rng(0))


def test_examples_random_fill_is_distinct_in_a_tight_catalog():
    rng = np.random.default_rng(1)
    ex = build_ranker_examples(np.arange(20) % 6, np.full((20, 2), -1), num_items=6, num_hard=2, num_random=3,
                               rng=rng)
    for row in ex.candidates:
        assert sorted(row.tolist()) == list(range(6))


def test_dense_features_by_hand():
    # One user, history of 2 items, 2 candidates, modalities "t" (2-d) and "i" (2-d).
    hist_t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    hist_i = torch.tensor([[[1.0, 0.0], [float("nan"), 0.0]]])
    hist_present = {"t": torch.tensor([[True, True]]), "i": torch.tensor([[True, False]])}
    cand_t = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    cand_i = torch.tensor([[[0.0, 3.0], [0.0, 0.0]]])
    cand_present = {"t": torch.tensor([[True, True]]), "i": torch.tensor([[True, False]])}
    out = ranker_dense_features(torch.tensor([[0.9, 0.1]]), torch.tensor([[2.0, 3.0]]),
                                {"t": cand_t, "i": cand_i}, cand_present, {"t": hist_t, "i": hist_i},
                                hist_present, ["t", "i"])
    assert out.shape == (1, 2, len(dense_feature_names(["t", "i"])))
    s = 1 / 2 ** 0.5
    # retrieval, sim_t, sim_i, max_sim_t, max_sim_i, has_t, has_i, log_popularity: candidate 0's text
    # is half-way between the two history items (mean: 1, nearest: s), candidate 1's equals the first.
    expected = torch.tensor([[[0.9, 1.0, 0.0, s, 0.0, 1.0, 1.0, 2.0],
                              [0.1, s, 0.0, 1.0, 0.0, 1.0, 0.0, 3.0]]])
    torch.testing.assert_close(out, expected)


def test_nearest_history_item_skips_absent_and_padded_positions():
    # History: item 0 (present) opposite to the candidate, item 1 absent but equal to it.
    hist = torch.tensor([[[-1.0, 0.0], [1.0, 0.0]]])
    cand = torch.tensor([[[1.0, 0.0]]])
    present = torch.tensor([[True, False]])
    out = ranker_dense_features(torch.zeros(1, 1), torch.zeros(1, 1), {"t": cand}, {"t": torch.tensor([[True]])},
                                {"t": hist}, {"t": present}, ["t"])
    names = dense_feature_names(["t"])
    assert out[0, 0, names.index("max_sim_t")].item() == pytest.approx(-1.0)  # not 0 (zeroed) nor 1 (leaked)
    out = ranker_dense_features(torch.zeros(1, 1), torch.zeros(1, 1), {"t": cand}, {"t": torch.tensor([[True]])},
                                {"t": hist}, {"t": torch.tensor([[True, True]])}, ["t"])
    assert out[0, 0, names.index("max_sim_t")].item() == pytest.approx(1.0)


def test_random_negatives_leave_out_excluded_items():
    rng = np.random.default_rng(2)
    U, items = 64, 30
    excluded = rng.random((U, items)) < 0.5
    positives = np.array([rng.choice(np.flatnonzero(~row)) for row in excluded])
    excluded[np.arange(U), positives] = False
    retrieved = np.array([[1, 2, 3]] * U)  # seen ones among these are not hard negatives either
    ex = build_ranker_examples(positives, retrieved, num_items=items, num_hard=2, num_random=5, rng=rng,
                               excluded=[np.flatnonzero(row) for row in excluded])
    for u, row in enumerate(ex.candidates):
        assert len(set(row.tolist())) == len(row)
        assert not excluded[u, row[1:]].any(), (u, row, np.flatnonzero(excluded[u]))
    # Without the mask the same draws do hit seen items (the test can fail).
    plain = build_ranker_examples(positives, retrieved, num_items=items, num_hard=2, num_random=5,
                                  rng=np.random.default_rng(2))
    assert any(excluded[u, row[1:]].any() for u, row in enumerate(plain.candidates))


def test_a_user_who_saw_nearly_everything_still_gets_a_full_list():
    items, H, R = 12, 2, 4
    excluded = np.ones((2, items), bool)
    excluded[0, :1 + H + R] = False  # exactly room for the list: every unseen item is in it
    excluded[1, :3] = False           # too little room: random negatives from the whole catalog
    ex = build_ranker_examples(np.array([0, 0]), np.array([[1, 2], [1, 2]]), num_items=items, num_hard=H,
                               num_random=R, rng=np.random.default_rng(0),
                               excluded=[np.flatnonzero(row) for row in excluded])
    assert sorted(ex.candidates[0].tolist()) == list(range(1 + H + R))
    assert len(set(ex.candidates[1].tolist())) == 1 + H + R
