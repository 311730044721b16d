"""The index job's item-vector actor with a GPU (``vectors.num_gpus`` > 0): the tower on CUDA gives the
CPU's vectors, nulls and statuses."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch

from tessera.index_job.vectors import column_matrix, item_vector_table, matrix_column
from tessera.models import ItemTower, ItemTowerConfig
from tests.gpu.conftest import needs_cuda

pytestmark = [pytest.mark.gpu, needs_cuda]


def test_item_vectors_on_cuda_match_the_cpu():
    torch.manual_seed(0)
    tower = ItemTower(ItemTowerConfig(modality_dims={"text": 6, "image": 4}, d_model=16, out_dim=8, proj_hidden=16,
                                      num_id_buckets=32)).eval()
    rng = np.random.default_rng(0)
    n = 300
    table = pa.table({"item_id": [f"i{i}" for i in range(n)],
                      "text": matrix_column(rng.standard_normal((n, 6)).astype(np.float32), rng.random(n) > 0.3),
                      "image": matrix_column(rng.standard_normal((n, 4)).astype(np.float32), rng.random(n) > 0.3)})
    ref = item_vector_table(tower, table, no_modality="id_only")
    out = item_vector_table(copy.deepcopy(tower).to("cuda"), table, no_modality="id_only")
    assert out.column_names == ref.column_names
    for name in ("item_id", "status", "modalities"):
        assert out.column(name).to_pylist() == ref.column(name).to_pylist()
    for name in ("fused", "text", "image"):
        a, b = column_matrix(ref.column(name), 8), column_matrix(out.column(name), 8)
        assert (np.isnan(a) == np.isnan(b)).all()
        np.testing.assert_allclose(np.nan_to_num(b), np.nan_to_num(a), atol=1e-4)
