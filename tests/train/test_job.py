"""The training job end to end on the real Ray (2 DDP workers) and the real S3 store."""

from __future__ import annotations

import math

import pytest
import torch

from tessera.models.bundle import ModelBundle
from tessera.storage import join_uri

from .conftest import read_final_state


@pytest.mark.slow
def test_trains_every_variant_and_writes_a_loadable_bundle(sample_embeddings, storage, trained_bundle):
    from tessera.train.job import BundleExistsError, run_training

    run_uri = sample_embeddings["output"]["uri"]
    cfg, manifest = trained_bundle  # the session's one training run (serving tests use it too)

    results = manifest["metrics"]["results"]
    assert set(results) == {"popularity", "fused", "fused_ranked", "text", "image", "audio", "id_only"}
    for name, r in results.items():
        for key in ("recall@10", "ndcg@10", "coverage@10", "recall@20", "mrr"):
            assert math.isfinite(r[key]) and 0.0 <= r[key] <= 1.0, (name, key, r[key])
        assert r["num_users"] > 0
    assert manifest["embedding_run"] == run_uri
    assert manifest["encoders"] == sample_embeddings["encoders"]
    assert sorted(manifest["modalities"]) == sorted(sample_embeddings["encoders"])
    assert manifest["training"]["data"]["unknown_items"] == 0
    # every epoch of every stage was reported (fused 2 + ranker 1 + 4 baselines x 2)
    assert len(storage.read_json(join_uri(cfg.bundle_uri, "metrics.json"))["history"]) == 11

    assert storage.exists(join_uri(cfg.bundle_uri, "item_popularity.parquet"))
    assert read_final_state(storage, manifest).resumes == []  # no worker restarted in a clean run

    bundle = ModelBundle.load(storage, cfg.bundle_uri)
    assert bundle.version == cfg.version and bundle.manifest["files"]
    dims = bundle.item_tower.config.modality_dims
    with torch.no_grad():
        items = bundle.item_tower({m: torch.randn(3, d) for m, d in dims.items()})
        user = bundle.user_tower(items[None], torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.long))
    assert items.shape == (3, 16) and torch.isfinite(user).all()

    with pytest.raises(BundleExistsError):
        run_training(cfg, storage)
