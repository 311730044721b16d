"""Index-job fixtures: a seeded (untrained) bundle over the session's embedding run, and job configs."""

from __future__ import annotations

import pytest

from tessera.index_job import IndexJobConfig
from tessera.index_job.seeded_bundle import seeded_bundle
from tessera.storage import join_uri
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
