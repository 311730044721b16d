"""The item-vector transform alone (no Ray): null handling, per-modality vectors, the no-modality policy."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from tessera.index_job.vectors import STATUS_NO_MODALITY, STATUS_OK, column_matrix, item_vector_table, matrix_column
from tessera.models import ItemTower, ItemTowerConfig
from tessera.models.item_tower import hash_item_ids


@pytest.fixture
def tower():
    torch.manual_seed(0)
    cfg = ItemTowerConfig(modality_dims={"text": 6, "image": 4}, d_model=16, out_dim=8, proj_hidden=16,
                          num_id_buckets=32)
    return ItemTower(cfg).eval()


def test_column_round_trip_keeps_nulls_and_offsets():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    col = matrix_column(x, np.array([True, False, True, True]))
    got = column_matrix(col.slice(1, 3), 3)  # a sliced array has a non-zero offset
    assert np.isnan(got[0]).all() and np.array_equal(got[1:], x[2:])


def test_fused_and_modal_vectors(tower):
    rng = np.random.default_rng(0)
    text = rng.standard_normal((3, 6)).astype(np.float32)
    image = rng.standard_normal((3, 4)).astype(np.float32)
    table = pa.table({"item_id": ["a", "b", "c"],
                      "text": matrix_column(text, np.array([True, False, False])),
                      "image": matrix_column(image, np.array([True, True, False]))})
    out = item_vector_table(tower, table)
    assert out.column("status").to_pylist() == [STATUS_OK, STATUS_OK, STATUS_NO_MODALITY]
    assert out.column("modalities").to_pylist() == ["text,image", "image", ""]
    fused = column_matrix(out.column("fused"), 8)
    assert np.allclose(np.linalg.norm(fused, axis=1), 1, atol=1e-5)
    # the excluded item still has the vector training fed the user tower for it (a history may hold it)
    with torch.no_grad():
        alone = tower({"text": torch.full((1, 6), torch.nan), "image": torch.full((1, 4), torch.nan)},
                      id_buckets=hash_item_ids(["c"], 32)).numpy()
    np.testing.assert_allclose(fused[2], alone[0], atol=1e-6)
    # the text column is the tower's projection of text alone, as a query would get it
    text_vecs = column_matrix(out.column("text"), 8)
    with torch.no_grad():
        expected = tower.project("text", torch.from_numpy(text[:1])).numpy()
    assert np.allclose(text_vecs[0], expected[0], atol=1e-5) and np.isnan(text_vecs[1:]).all()
    # id_only keeps the item without modalities (its hashed-id vector)
    kept = item_vector_table(tower, table, no_modality="id_only")
    assert kept.column("status").to_pylist() == [STATUS_OK] * 3
    assert np.isfinite(column_matrix(kept.column("fused"), 8)).all()
