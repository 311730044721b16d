"""Pieces of the Ray Train loop that need no Ray: which epoch a stage keeps, and the copy it keeps."""

from __future__ import annotations

import math

import torch

from tessera.train.worker import _copy, improves


def test_the_best_epoch_is_the_first_of_the_highest_and_nan_never_beats_a_score():
    assert improves(0.1, None)
    assert improves(0.2, 0.1) and not improves(0.1, 0.1) and not improves(0.05, 0.1)  # equals keep the earlier
    assert not improves(math.nan, 0.1)  # an epoch without a validation score never displaces one with it
    assert improves(0.1, math.nan) and improves(math.nan, math.nan)  # no validation at all: the last epoch


def test_the_kept_copy_does_not_follow_training():
    layer = torch.nn.Linear(3, 2)
    kept = _copy(layer.state_dict())
    before = kept["weight"].clone()
    with torch.no_grad():
        layer.weight.add_(1.0)  # what an optimiser step does to the live parameters
    assert torch.equal(kept["weight"], before) and not torch.equal(layer.weight, before)
    assert kept["weight"].device.type == "cpu"
