"""The job's recall self-check on real vectors parts and a saved index in the S3 store (no Ray needed)."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tessera.index import IndexConfig, ShardedIndex, assign_shards, exact_search, recall_at_k
from tessera.index_job.config import SelfCheckConfig
from tessera.index_job.self_check import run_self_check
from tessera.index_job.vectors import matrix_column
from tessera.storage import join_uri
from tests.index.conftest import unit_rows


def _write_part(storage, uri: str, ids: list[str], vectors: np.ndarray) -> str:
    part = join_uri(uri, "vectors", "part-00000.parquet")
    table = pa.table({"item_id": pa.array(ids, pa.string()),
                      "fused": matrix_column(vectors, np.ones(len(ids), dtype=bool))})
    fs, path = storage.filesystem(part)
    with fs.open_output_stream(path) as out:
        pq.write_table(table, out)
    return part


def test_item_queries_exclude_their_item_and_ties_count(storage, bucket_uri):
    """Duplicate vectors (4 copies of each of 30), laid out so exact search and the shard merge keep
    different copies at the cut-off: every answer of the exact index is right, and the check says 1.0."""
    base = unit_rows(np.random.default_rng(11), 30, 16)
    ids = [f"g{g:02d}-c{c}" for g in range(30) for c in range(4)]
    shard_of = {ids[r]: s for s, rows in enumerate(assign_shards(ids, 2)) for r in rows}
    ids = [i for g in range(30) for i in sorted(ids[4 * g:4 * g + 4], key=lambda i: -shard_of[i])]
    vectors = np.stack([base[int(i[1:3])] for i in ids])  # (120, 16)
    part = _write_part(storage, bucket_uri, ids, vectors)
    index = ShardedIndex.from_arrays(ids, vectors, IndexConfig(), num_shards=2)
    manifest = index.save(storage, bucket_uri)
    cfg = SelfCheckConfig(item_queries=60, user_queries=0, k=10)
    checks = run_self_check(storage, bucket_uri, manifest, [part], "fused", cfg)
    item = checks["item"]
    assert set(checks) == {"item"} and item.num_queries == 60 and item.recall == 1.0
    assert item.query_items_excluded and "each item excluded from its own results" in item.queries
    # the same queries scored as before (ids as sets, the item itself included) miss tied copies
    sample = np.sort(np.random.default_rng(cfg.seed).choice(len(ids), size=60, replace=False))
    found, _ = index.search(vectors[sample], 10)
    truth, _ = exact_search(vectors[sample], vectors, 10)
    assert recall_at_k(found, [[ids[r] for r in row] for row in truth]) < 0.95


def test_item_queries_do_not_count_the_item_itself(storage, bucket_uri):
    """An AH index without reordering depth: the item's own vector is always found, its nearest other
    item often not; the check reports the latter."""
    ids = [f"i{r:04d}" for r in range(3_000)]
    vectors = unit_rows(np.random.default_rng(12), 3_000, 32)
    part = _write_part(storage, bucket_uri, ids, vectors)
    index = ShardedIndex.from_arrays(ids, vectors, IndexConfig(mode="ah", num_neighbors=1, reorder_num_neighbors=1,
                                                               training_threads=1), num_shards=2)
    manifest = index.save(storage, bucket_uri)
    cfg = SelfCheckConfig(item_queries=100, user_queries=0, k=1)
    check = run_self_check(storage, bucket_uri, manifest, [part], "fused", cfg)["item"]
    sample = np.sort(np.random.default_rng(cfg.seed).choice(len(ids), size=100, replace=False))
    q = vectors[sample]
    with_self, _ = index.search(q, 1)
    assert recall_at_k(with_self, [[ids[r]] for r in sample]) >= 0.99
    without, _ = index.search(q, 1, [{ids[r]} for r in sample])
    truth, _ = exact_search(q, vectors, 1, [[r] for r in sample])
    assert check.recall == pytest.approx(recall_at_k(without, [[ids[r] for r in row] for row in truth]))
    assert check.recall < 0.85


def test_a_config_without_item_queries_is_refused_naming_the_key(tmp_path):
    """Every index (the per-modality ones have no other) is checked on item queries: 0 would publish
    indexes with no recall measured, which pass any floor."""
    import yaml

    from tessera.config import ConfigError, load_config
    from tessera.index_job.config import IndexJobConfig

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "index.yaml").read_text())
    data["self_check"]["item_queries"] = 0
    path = tmp_path / "index.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=f"key 'self_check.item_queries' in file {path}"):
        load_config(IndexJobConfig, path)


def test_check_tasks_reserve_the_configured_memory():
    assert SelfCheckConfig().task_options(1.0) == {"num_cpus": 1.0}
    assert SelfCheckConfig(memory_gb=2).task_options(0.5) == {"num_cpus": 0.5, "memory": 2 << 30}
