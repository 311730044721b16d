"""Pieces of the Ray Train loop that need no Ray: which epoch a stage keeps, the copy it keeps, and the
weights a stage ends with."""

from __future__ import annotations

import math

import pytest
import torch

from tessera.train.state import TrainState
from tessera.train.worker import Stage, _copy, finish_stage, improves, offer_epoch


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


class _WithRanker(torch.nn.Module):
    """Stands for RankerModel's layout: the ranker stage keeps only ``.ranker``'s weights."""

    def __init__(self):
        super().__init__()
        self.retrieval = torch.nn.Linear(3, 2)
        self.ranker = torch.nn.Linear(2, 1)


@pytest.mark.parametrize("kind", ["retrieval", "ranker"])
def test_a_stage_ends_holding_its_best_epoch_not_its_last(kind):
    """Epochs scoring 0.3, 0.5, 0.4: the stage keeps epoch 2's weights, in the model (which the test then
    evaluates) and in ``state.models`` (which later stages build on and the bundle ships)."""
    model = _WithRanker() if kind == "ranker" else torch.nn.Linear(3, 2)
    trained = model.ranker if kind == "ranker" else model
    stage, state, seen = Stage(kind, "s", 3), TrainState(), []
    for epoch, score in enumerate([0.3, 0.5, 0.4], start=1):
        with torch.no_grad():
            trained.weight.add_(1.0)  # an epoch of training
        seen.append(trained.weight.detach().clone())
        offer_epoch(state, model, stage, epoch, score)
    assert finish_stage(state, model, stage, 3) == 2 and state.kept_epochs == {"s": 2} and state.best is None
    assert torch.equal(trained.weight, seen[1]) and torch.equal(state.models["s"]["weight"], seen[1])
    if kind == "ranker":
        assert set(state.models["s"]) == {"weight", "bias"}  # the ranker's own weights only


def test_without_a_kept_best_the_stage_keeps_its_last_epoch():
    model, stage, state = torch.nn.Linear(3, 2), Stage("retrieval", "s", 2), TrainState()
    assert finish_stage(state, model, stage, 2) == 2 and torch.equal(state.models["s"]["weight"], model.weight)
