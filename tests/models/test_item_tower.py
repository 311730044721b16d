from __future__ import annotations

import json

import pytest
import torch

from tessera.models import ItemTower, ItemTowerConfig, artifacts, hash_item_ids
from tessera.models.item_tower import drop_modalities

DIMS = {"text": 12, "image": 10, "audio": 6}


def tiny(**kw) -> ItemTower:
    cfg = dict(modality_dims=DIMS, d_model=16, n_heads=2, n_layers=2, proj_hidden=24, out_dim=8, dropout=0.0)
    cfg.update(kw)
    return ItemTower(ItemTowerConfig(**cfg)).eval()


def batch(B: int = 5) -> dict[str, torch.Tensor]:
    return {m: torch.randn(B, d) for m, d in DIMS.items()}


def test_shapes_and_unit_norm():
    tower = tiny()
    out = tower(batch(), masks={"image": torch.tensor([True, False, True, False, True])})
    assert out.shape == (5, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))


def test_masked_modality_values_do_not_matter():
    tower = tiny()
    x = batch()
    masks = {"audio": torch.tensor([False, True, False, True, False])}
    other = dict(x, audio=torch.where(masks["audio"][:, None], x["audio"], torch.full_like(x["audio"], 1e3)))
    nan = dict(x, audio=torch.where(masks["audio"][:, None], x["audio"], torch.full_like(x["audio"], float("nan"))))
    ref = tower(x, masks)
    torch.testing.assert_close(tower(other, masks), ref)
    torch.testing.assert_close(tower(nan, masks), ref)
    # NaN rows without a mask count as missing too; leaving the modality out equals masking it everywhere.
    torch.testing.assert_close(tower(nan)[~masks["audio"]], ref[~masks["audio"]])
    no_audio = {k: v for k, v in x.items() if k != "audio"}
    torch.testing.assert_close(tower(no_audio), tower(x, {"audio": torch.zeros(5, dtype=torch.bool)}))


def test_present_modalities_change_the_output():
    tower = tiny()
    x = batch(2)
    y = dict(x, image=torch.randn(2, DIMS["image"]))
    assert not torch.allclose(tower(x), tower(y))


def test_item_without_any_modality_is_finite_learned_empty_vector():
    tower = tiny()
    none = {m: torch.zeros(3, dtype=torch.bool) for m in DIMS}
    out = tower(batch(3), none)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(out[0], out[1])  # nothing item-specific is left
    tower.train()
    loss = tower(batch(3), none).sum()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in tower.parameters() if p.grad is not None)


def test_hashed_id_embedding_distinguishes_items_without_content():
    tower = tiny(num_id_buckets=50)
    none = {m: torch.zeros(2, dtype=torch.bool) for m in DIMS}
    out = tower(batch(2), none, id_buckets=torch.tensor([3, 7]))
    assert torch.isfinite(out).all() and not torch.allclose(out[0], out[1])
    unknown = tower(batch(2), none, id_buckets=torch.tensor([-1, -1]))
    torch.testing.assert_close(unknown[0], unknown[1])


def test_hash_item_ids_is_stable_and_in_range():
    ids = ["sku-1", "sku-2", "sku-1", "émoji-🎧"]
    h = hash_item_ids(ids, 97)
    assert h.dtype == torch.long and int(h.min()) >= 0 and int(h.max()) < 97
    assert h[0] == h[2]
    torch.testing.assert_close(h, hash_item_ids(ids, 97))
    # Pinned values: not Python's per-process salted hash(), so every worker and replica agrees.
    assert hash_item_ids(["sku-1", "sku-2", "item-42"], 1000).tolist() == [517, 365, 962]


def test_modality_dropout_never_drops_all_present():
    present = torch.rand(2000, 3) > 0.4
    kept = drop_modalities(present, p=0.9)
    assert not (kept & ~present).any()  # only drops
    assert torch.equal(kept.any(dim=1), present.any(dim=1))  # never all of an item's modalities
    multi = present.sum(dim=1) > 1
    assert (kept.sum(dim=1)[multi] < present.sum(dim=1)[multi]).float().mean() > 0.8  # it does drop


def test_training_mode_with_dropout_is_finite():
    tower = tiny(modality_dropout=0.9, dropout=0.1, num_id_buckets=10, id_dropout=0.5).train()
    masks = {"text": torch.tensor([True, False, False, False]), "image": torch.tensor([True, True, False, False]),
             "audio": torch.tensor([False, False, True, False])}
    out = tower(batch(4), masks, id_buckets=torch.tensor([1, 2, -1, -1]))
    assert torch.isfinite(out).all()


def test_project_equals_single_modality_item_and_rejects_unknown():
    tower = tiny()
    q = torch.randn(3, DIMS["text"])
    vec = tower.project("text", q)
    torch.testing.assert_close(vec.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(vec, tower({"text": q}))
    torch.testing.assert_close(tower.project("text", q[0]), vec[0])
    with pytest.raises(KeyError):
        tower.project("video", q)
    with pytest.raises(KeyError):
        tower({"video": q})


def test_config_validation():
    with pytest.raises(ValueError):
        ItemTowerConfig(d_model=10, n_heads=4)
    with pytest.raises(ValueError):
        ItemTowerConfig(modality_dims={})
    with pytest.raises(ValueError):
        ItemTowerConfig(unknown_key=1)


def test_save_load_round_trip(tmp_path):
    tower = tiny(num_id_buckets=20, d_model=24, n_heads=3)
    x, ids = batch(), torch.tensor([1, 2, 3, -1, 5])
    tower.save(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model_class"] == "ItemTower"
    assert set(meta["config"]) == set(ItemTowerConfig.model_fields)  # every field written, defaults too
    assert (tmp_path / "model.safetensors").exists()
    loaded = ItemTower.load(tmp_path)
    assert loaded.config == tower.config and not loaded.training
    for key, value in tower.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.testing.assert_close(loaded(x, id_buckets=ids), tower(x, id_buckets=ids), rtol=1e-5, atol=1e-6)


def test_save_load_torch_fallback_and_wrong_class(tmp_path, monkeypatch):
    from tessera.models import UserTower

    tower = tiny()
    monkeypatch.setattr(artifacts, "safetensors_available", lambda: False)
    tower.save(tmp_path)
    assert (tmp_path / "model.pt").exists() and not (tmp_path / "model.safetensors").exists()
    x = batch()
    torch.testing.assert_close(ItemTower.load(tmp_path)(x), tower(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ItemTower"):
        UserTower.load(tmp_path)
