"""Shared index fixtures: a seeded random catalog of unit vectors and indexes built from it once."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.index import IndexConfig, ShardedIndex

N_ITEMS, DIM = 30_000, 64


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="session")
def catalog() -> tuple[list[str], np.ndarray]:
    """30k random unit vectors in 64-d (the hardest case for partitioning: no cluster structure)."""
    rng = np.random.default_rng(7)
    return [f"item-{i:05d}" for i in range(N_ITEMS)], unit_rows(rng, N_ITEMS, DIM)


@pytest.fixture(scope="session")
def queries() -> np.ndarray:
    return unit_rows(np.random.default_rng(8), 200, DIM)


@pytest.fixture(scope="session")
def ah_config() -> IndexConfig:
    """Lowers the brute-force threshold so that 10k-item shards take ScaNN's AH + reorder path."""
    return IndexConfig(brute_force_below=5_000, training_threads=1)


@pytest.fixture(scope="session")
def ah_index(catalog, ah_config) -> ShardedIndex:
    ids, vectors = catalog
    index = ShardedIndex.from_arrays(ids, vectors, ah_config, num_shards=3)
    assert [s.params.mode for s in index.shards] == ["ah"] * 3
    return index


@pytest.fixture(scope="session")
def small_catalog() -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(9)
    return [f"small-{i:04d}" for i in range(6_000)], unit_rows(rng, 6_000, 32)


@pytest.fixture(scope="session")
def exact_index(small_catalog) -> ShardedIndex:
    """Three brute-force shards (6k items is under every threshold)."""
    ids, vectors = small_catalog
    index = ShardedIndex.from_arrays(ids, vectors, IndexConfig(), num_shards=3)
    assert [s.params.mode for s in index.shards] == ["brute_force"] * 3
    return index
