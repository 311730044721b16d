from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from tessera.models import (
    cross_modal_infonce,
    info_nce,
    listwise_softmax_loss,
    log_sampling_probability,
    logq_correct,
    ranker_bce_loss,
    sampled_softmax_loss,
)


def unit(*shape) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


def test_logq_correct_subtracts_log_q_per_column():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    q = torch.tensor([0.5, 0.25, 0.25])
    out = logq_correct(logits, q.log())
    expected = torch.tensor([[1 + math.log(2), 2 + math.log(4), 3 + math.log(4)],
                             [math.log(2), math.log(4), math.log(4)]])
    torch.testing.assert_close(out, expected)


def test_sampled_softmax_matches_formula_by_hand():
    u, v = unit(3, 4), unit(3, 4)
    log_q = torch.tensor([0.9, 0.05, 0.05]).log()
    t = 0.5
    loss = sampled_softmax_loss(u, v, log_q, temperature=t)
    logits = (u @ v.T) / t - log_q[None, :]
    expected = -torch.stack([logits[i].log_softmax(0)[i] for i in range(3)]).mean()
    torch.testing.assert_close(loss, expected)
    # Popular items are penalised as negatives less: the correction really changes the loss ...
    assert not torch.isclose(loss, sampled_softmax_loss(u, v, None, temperature=t))
    # ... but a uniform q is a constant shift per row and changes nothing.
    uniform = torch.full((3,), 1 / 3).log()
    torch.testing.assert_close(sampled_softmax_loss(u, v, uniform, temperature=t),
                               sampled_softmax_loss(u, v, None, temperature=t))


def test_duplicate_positives_are_masked_and_weights_apply():
    u, v = unit(4, 6), unit(4, 6)
    ids = torch.tensor([7, 3, 7, 1])
    v[2] = v[0]  # the same item twice in the batch
    loss = sampled_softmax_loss(u, v, None, temperature=1.0, item_ids=ids, weights=torch.tensor([1.0, 0, 0, 0]))
    logits = u @ v.T
    row0 = torch.cat([logits[0, :2], logits[0, 3:]])  # column 2 (duplicate of 7) dropped
    torch.testing.assert_close(loss, -row0.log_softmax(0)[0])
    full = sampled_softmax_loss(u, v, None, temperature=1.0, item_ids=ids)
    assert torch.isfinite(full)


def test_log_sampling_probability():
    lq = log_sampling_probability(np.array([3, 0, 1]), smoothing=1.0)
    torch.testing.assert_close(lq.exp(), torch.tensor([4 / 7, 1 / 7, 2 / 7]))


def test_info_nce_low_for_aligned_high_for_shuffled():
    a = unit(16, 8)
    aligned = info_nce(a, a, temperature=0.05)
    shuffled = info_nce(a, a[torch.randperm(16)], temperature=0.05)
    assert aligned < 0.1 < shuffled


def test_cross_modal_infonce_uses_only_pairs_present_in_both():
    a, b, c = unit(5, 8), unit(5, 8), unit(5, 8)
    pa = torch.tensor([True, True, True, False, True])
    pb = torch.tensor([True, True, True, True, False])
    pc = torch.zeros(5, dtype=torch.bool)
    loss = cross_modal_infonce({"a": (a, pa), "b": (b, pb), "c": (c, pc)}, temperature=0.1)
    both = pa & pb
    torch.testing.assert_close(loss, info_nce(a[both], b[both], 0.1))
    a2, b2 = a.clone(), b.clone()
    a2[3] = unit(8)  # a row where b is missing
    b2[4] = unit(8)  # a row where a is missing
    torch.testing.assert_close(cross_modal_infonce({"a": (a2, pa), "b": (b2, pb)}, temperature=0.1), loss)


def test_cross_modal_infonce_without_pairs_is_zero_and_connected():
    a = unit(3, 4).requires_grad_()
    b = unit(3, 4)
    loss = cross_modal_infonce({"a": (a, torch.tensor([True, False, False])), "b": (b, torch.ones(3, dtype=bool))})
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(a.grad, torch.zeros_like(a))


def test_ranker_bce_respects_mask():
    logits = torch.tensor([[2.0, -1.0, 5.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    expected = (F.softplus(torch.tensor(-2.0)) + F.softplus(torch.tensor(-1.0))) / 2
    torch.testing.assert_close(ranker_bce_loss(logits, labels, mask), expected)


def test_listwise_softmax_by_hand():
    logits = torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # second list has no positive: skipped
    mask = torch.tensor([[True, True, False], [True, True, True]])
    expected = -torch.tensor([1.0, 0.0]).log_softmax(0)[0]
    torch.testing.assert_close(listwise_softmax_loss(logits, labels, mask), expected)
    assert listwise_softmax_loss(logits[1:], labels[1:]).item() == 0.0
