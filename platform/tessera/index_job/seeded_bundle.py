"""A placeholder model bundle with untrained, seeded towers, for tests and demos of the index job.

This is a stand-in: it lets the index job (and serving) run before ``jobs.train`` has produced a
trained bundle. The towers are randomly initialised (seeded, so reproducible); the index job does not
care whether weights are trained, and the manifest says ``"placeholder": true``.

Example::

    run = storage.read_json("s3://tessera-demo/embeddings/demo/_MANIFEST.json")
    seeded_bundle(run, version="seeded-0").save(storage, "s3://tessera-demo/models/seeded-0")
"""

from __future__ import annotations


def seeded_bundle(embedding_manifest: dict, version: str, seed: int = 0, out_dim: int = 64,
                  num_id_buckets: int = 0):
    """An untrained :class:`~tessera.models.bundle.ModelBundle` matching an embedding run's encoders.

    Args:
        embedding_manifest: the run's ``_MANIFEST.json`` (encoder dims, output URI).
        version: the bundle version.
        seed: torch seed of the initialisation.
        out_dim: item / user vector width.
        num_id_buckets: hashed item-id buckets of the item tower (0: none).
    """
    import torch

    from tessera.models import (
        ItemTower,
        ItemTowerConfig,
        Ranker,
        RankerConfig,
        UserTower,
        UserTowerConfig,
        dense_feature_names,
    )
    from tessera.models.bundle import ModelBundle

    encoders = embedding_manifest["encoders"]
    dims = {m: int(e["dim"]) for m, e in encoders.items()}
    torch.manual_seed(seed)
    item = ItemTower(ItemTowerConfig(modality_dims=dims, d_model=64, proj_hidden=128, out_dim=out_dim,
                                     num_id_buckets=num_id_buckets))
    user = UserTower(UserTowerConfig(item_dim=out_dim, d_model=64, max_history=20))
    ranker = Ranker(RankerConfig(item_dim=out_dim, dense_features=dense_feature_names(list(dims))))
    manifest = {"version": version, "embedding_run": embedding_manifest["output"]["uri"], "encoders": encoders,
                "modalities": list(dims), "metrics": {}, "placeholder": True,
                "note": f"untrained towers, torch seed {seed} (stand-in until jobs.train produces a bundle)"}
    return ModelBundle(item.eval(), user.eval(), ranker.eval(), manifest=manifest)
