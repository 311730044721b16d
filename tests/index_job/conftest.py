"""Index-job fixtures: a seeded (untrained) bundle over the session's embedding run, and job configs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tessera.index_job import IndexJobConfig
from tessera.index_job.build import index_rows
from tessera.index_job.seeded_bundle import seeded_bundle
from tessera.index_job.vectors import column_matrix
from tessera.storage import Storage, join_uri
from tests.conftest import TEST_ROOT


@pytest.fixture(scope="session")
def bundle_uri(sample_embeddings, storage) -> str:
    """A placeholder bundle (seeded towers, 32-d vectors) naming the session's embedding run."""
    uri = join_uri(TEST_ROOT, "models", "seeded-index")
    seeded_bundle(sample_embeddings, version="seeded-index", seed=0, out_dim=32).save(storage, uri)
    return uri


def job_config(bundle_uri: str, output_uri: str, **overrides) -> IndexJobConfig:
    """A job config sized for the 2-CPU test Ray: 2 shards, one CPU per build, small self-check (its tasks
    reserving a little memory, so that the reservation path runs)."""
    data = {"model_uri": bundle_uri, "output_uri": output_uri, "num_shards": 2,
            "build": {"num_cpus": 1}, "vectors": {"actors": 1, "num_cpus": 0.5, "batch_size": 64},
            "self_check": {"user_queries": 40, "item_queries": 40, "memory_gb": 0.05}}
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return IndexJobConfig.model_validate(data)


def read_rows(storage: Storage, parts: list[str], column: str, index_only: bool = True) -> tuple[list[str], np.ndarray]:
    """Ids and (N, D) vectors of ``column``, part by part: the rows of the index it feeds (``fused``: status
    ok; a modality: the items that have it), or with ``index_only=False`` every row with a vector (every
    row's ``fused``). A whole column, read in the test process (the reference the tests compare the job's
    distributed reads with)."""
    got_ids, blocks, dim = [], [], None
    for uri in parts:
        table = storage.read_parquet(uri, ["item_id", "status", "modalities", column])
        keep = index_rows(table, column) if index_only else table.column(column).is_valid().to_numpy(
            zero_copy_only=False)
        table = table.filter(pa.array(keep))
        assert not table.column(column).null_count, f"{uri}: a row of the {column} index without a vector"
        dim = table.schema.field(column).type.list_size
        if table.num_rows:
            got_ids.extend(table.column("item_id").to_pylist())
            blocks.append(column_matrix(table.column(column), dim))
    vectors = np.concatenate(blocks) if blocks else np.empty((0, dim or 0), np.float32)
    return got_ids, vectors
