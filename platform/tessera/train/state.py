"""What a training checkpoint holds, how it is written, and the model bundle it gives (plain torch, no Ray).

One file, ``state.pt``: the position in the stage plan (``stage``, ``epoch``: the next epoch to
run), the state dicts of every finished stage's model (the epoch it kept, ``kept_epochs``), the
unfinished stage's model and optimiser and its best epoch so far (``best``, with ``keep_epoch: best``),
the evaluation results so far, the per-epoch history and where each restart resumed from.

Example::

    save_state(TrainState(stage=1, epoch=0, models={"fused": model.state_dict()}), "ckpt/state.pt")
    state = load_state("ckpt/state.pt")
    bundle = bundle_from_state(cfg, state, catalog, counts)     # on the CPU, whatever device trained
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from tessera.models.bundle import ModelBundle
from tessera.train.catalog import ItemCatalog
from tessera.train.config import TrainConfig
from tessera.train.ranking import RankerModel
from tessera.train.retrieval import TwoTowerModel, variant

STATE_FILE = "state.pt"
RANKED = "fused_ranked"  # the ranker stage's name; its weights are ``TrainState.models[RANKED]``


@dataclass
class TrainState:
    """Training progress; see the module docstring."""

    stage: int = 0
    epoch: int = 0
    models: dict[str, dict] = field(default_factory=dict)
    current: dict | None = None
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    resumes: list[dict] = field(default_factory=list)
    best: dict | None = None  # the unfinished stage's best epoch so far: {"epoch", "score", "model"}
    kept_epochs: dict[str, int] = field(default_factory=dict)  # per finished stage, the epoch it kept


def save_state(state: TrainState, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` (tensors moved to CPU first, so any device can load it)."""

    def cpu(obj):
        if isinstance(obj, torch.Tensor):
            return obj.detach().to("cpu")
        if isinstance(obj, dict):
            return {k: cpu(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [cpu(v) for v in obj]
        return obj

    torch.save(cpu(asdict(state)), path)


def load_state(path: str | os.PathLike) -> TrainState:
    """Read a state written by :func:`save_state`."""
    return TrainState(**torch.load(path, map_location="cpu", weights_only=False))


def bundle_from_state(cfg: TrainConfig, state: TrainState, catalog: ItemCatalog, counts: np.ndarray) -> ModelBundle:
    """Rebuild the fused towers and the ranker from a final training state (eval mode)."""
    fused = TwoTowerModel.build(variant("fused", catalog.modalities, cfg.towers.fused_ids), catalog, cfg.towers,
                                counts, cfg.max_history)
    fused.load_state_dict(state.models["fused"])
    ranked = RankerModel.build(fused, counts, cfg.ranker, cfg.max_history)
    if RANKED in state.models:
        ranked.ranker.load_state_dict(state.models[RANKED])
    return ModelBundle(fused.item_tower.eval(), fused.user_tower.eval(), ranked.ranker.eval())
