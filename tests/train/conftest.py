"""Fixtures for the training tests: a tiny TrainConfig over the session's corpus and embedding run."""

from __future__ import annotations

import os
import tempfile
import uuid

import pytest

from tests.conftest import TEST_ROOT


def tiny_train_config(embeddings_uri: str, out_root: str, **overrides):
    """Few epochs, small towers, 2 workers x 0.5 CPU: fits the 2-CPU test Ray beside nothing else."""
    from tessera.train.config import TrainConfig

    data = {
        "interactions_uri": f"{TEST_ROOT}/corpus/interactions", "embeddings_uri": embeddings_uri,
        "models_uri": f"{out_root}/models", "checkpoint_uri": f"{out_root}/checkpoints",
        "version": "t" + uuid.uuid4().hex[:8], "max_history": 8, "ks": [10, 20], "keep_epoch": "best",
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "torch_threads": 1},
        "towers": {"d_model": 16, "out_dim": 16, "n_heads": 2, "proj_hidden": 32, "epochs": 2, "batch_size": 32},
        "ranker": {"epochs": 1, "batch_size": 32, "candidates": 20, "num_hard": 4, "num_random": 4},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainConfig.model_validate(data)


@pytest.fixture
def train_root(storage, bucket_uri) -> str:
    storage.ensure_bucket(bucket_uri)
    return bucket_uri


def read_final_state(storage, manifest: dict):
    """The :class:`TrainState` in the final checkpoint named by a bundle manifest."""
    from tessera.storage import join_uri
    from tessera.train.state import STATE_FILE, load_state

    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, STATE_FILE)
        with open(local, "wb") as f:
            f.write(storage.read_bytes(join_uri(manifest["training"]["checkpoint"], STATE_FILE)))
        return load_state(local)


def kept_validation_ndcg(cfg, storage, state, stages: list[str]) -> dict[str, float]:
    """Validation NDCG@10 of each retrieval stage's model as the final state holds it (what later stages
    built on and the bundle ships), evaluated here, on the driver, as the workers evaluate every epoch."""
    from tessera.train.catalog import ItemCatalog
    from tessera.train.datasets import build_datasets
    from tessera.train.evaluate import evaluate_retrieval
    from tessera.train.examples import EvalSet, item_counts
    from tessera.train.retrieval import TwoTowerModel, variant

    users = build_datasets(cfg, storage).users.to_pandas()
    records = {c: users[c].to_numpy() for c in users.columns}
    catalog = ItemCatalog.load(storage, cfg.embeddings_uri)
    counts = item_counts(records, catalog.num_items)
    val = EvalSet.from_records(records, cfg.max_history, "validation")
    out = {}
    for stage in stages:
        model = TwoTowerModel.build(variant(stage, catalog.modalities, cfg.towers.fused_ids), catalog, cfg.towers,
                                    counts, cfg.max_history)
        model.load_state_dict(state.models[stage])
        out[stage] = evaluate_retrieval(model, val, cfg.ks)["ndcg@10"]
    return out
