"""The model bundle round-trips through the real S3 store and detects a damaged file."""

import pytest
import torch

from tessera.models import ItemTower, ItemTowerConfig, Ranker, RankerConfig, UserTower, UserTowerConfig
from tessera.models.bundle import BundleCorruptError, ModelBundle
from tessera.storage import join_uri


def _bundle():
    torch.manual_seed(0)
    cfg = ItemTowerConfig(modality_dims={"text": 8, "image": 6}, d_model=16, out_dim=16, proj_hidden=16)
    return ModelBundle(ItemTower(cfg).eval(), UserTower(UserTowerConfig(item_dim=16, d_model=16)).eval(),
                       Ranker(RankerConfig(item_dim=16, dense_features=["retrieval_score"])).eval(),
                       manifest={"version": "v-test", "embedding_run": "s3://x/embeddings/r"})


def test_round_trip_and_checksums(storage, bucket_uri):
    bundle = _bundle()
    uri = join_uri(bucket_uri, "models", "v-test")
    manifest = bundle.save(storage, uri)
    assert manifest["kind"] == "tessera.model" and "item_tower/config.json" in manifest["files"]
    loaded = ModelBundle.load(storage, uri)
    x = {"text": torch.randn(3, 8), "image": torch.randn(3, 6)}
    with torch.no_grad():
        assert torch.allclose(bundle.item_tower(x), loaded.item_tower(x), atol=1e-6)
    assert loaded.version == "v-test" and loaded.manifest["embedding_run"] == "s3://x/embeddings/r"
    # damage one weight file: loading names it
    weights = next(f for f in manifest["files"] if f.startswith("user_tower/") and f != "user_tower/config.json")
    data = bytearray(storage.read_bytes(join_uri(uri, weights)))
    data[-1] ^= 0xFF
    storage.write_bytes(join_uri(uri, weights), bytes(data))
    with pytest.raises(BundleCorruptError, match=weights):
        ModelBundle.load(storage, uri)
    with pytest.raises(FileNotFoundError):
        ModelBundle.load(storage, join_uri(bucket_uri, "models", "absent"))
