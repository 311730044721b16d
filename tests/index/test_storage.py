"""Saving to the real S3 store and loading back: identical results, manifests, checksum failures."""

import json

import numpy as np
import pytest

from tessera.index import (
    IndexConfig,
    IndexCorruptError,
    ShardedIndex,
    assign_shards,
    build_and_save_shard,
    make_index_manifest,
    measure_recall,
    read_index_manifest,
    write_index_manifest,
)
from tessera.index.shard_io import sha256_file
from tessera.storage import join_uri


def _flip_byte(storage, uri, offset):
    data = bytearray(storage.read_bytes(uri))
    data[offset % len(data)] ^= 0x01
    storage.write_bytes(uri, bytes(data))


@pytest.fixture(scope="module")
def saved_ah(storage, ah_index, catalog, queries):
    storage.ensure_bucket("s3://tessera-test")
    import uuid

    uri = f"s3://tessera-test/index-{uuid.uuid4().hex[:8]}/v1"
    ids, vectors = catalog
    check = measure_recall(ah_index, queries, ids, vectors, k=10)
    manifest = ah_index.save(storage, uri, model_version="m-1", embedding_run="run-1", recall_check=check)
    return uri, manifest


def test_s3_roundtrip_gives_identical_results(storage, saved_ah, ah_index, queries):
    uri, manifest = saved_ah
    loaded = ShardedIndex.load(storage, uri)
    exclude = [{f"item-{i:05d}" for i in range(j, 30_000, 997)} for j in range(len(queries))]
    for ex in (None, exclude):
        before, after = ah_index.search(queries, 10, ex), loaded.search(queries, 10, ex)
        assert after[0] == before[0] and np.array_equal(after[1], before[1])
    assert [s.params for s in loaded.shards] == [s.params for s in ah_index.shards]
    assert loaded.manifest == manifest


def test_manifest_records_the_build(storage, saved_ah, ah_index):
    uri, _ = saved_ah
    manifest = read_index_manifest(storage, uri)
    assert (manifest.index_version, manifest.model_version, manifest.embedding_run) == ("v1", "m-1", "run-1")
    assert manifest.dim == 64 and manifest.num_items == 30_000 and manifest.num_shards == 3
    assert manifest.shard_counts == {"shard-0000": 10_000, "shard-0001": 10_000, "shard-0002": 10_000}
    assert manifest.recall_check.recall >= 0.95 and manifest.timings["build"] > 0
    shard = manifest.shards[0]
    assert {"ids.parquet", "scann/scann_assets.pbtxt", "scann/scann_config.pb"} <= set(shard.files)
    assert all(len(f.sha256) == 64 and f.bytes > 0 for f in shard.files.values())
    listed = {f.rsplit("/", 2)[-2] + "/" + f.rsplit("/", 1)[-1] for f in storage.list_files(uri)
              if "/scann/" not in f}
    assert "shard-0002/shard.json" in listed and "shard-0002/ids.parquet" in listed


def test_corrupt_byte_is_detected(storage, ah_index, queries, tmp_path, bucket_uri):
    ah_index.save(storage, bucket_uri)
    target = join_uri(bucket_uri, "shard-0001", "scann", "hashed_dataset.npy")
    _flip_byte(storage, target, 4_000)
    with pytest.raises(IndexCorruptError, match=r"shard-0001, file scann/hashed_dataset\.npy: sha256 mismatch") as err:
        ShardedIndex.load(storage, bucket_uri, cache_dir=tmp_path)
    assert (err.value.shard, err.value.file) == ("shard-0001", "scann/hashed_dataset.npy")
    assert not list(tmp_path.glob("shard-0001-*/scann/hashed_dataset.npy"))  # never kept
    assert not list(tmp_path.glob("**/.partial-*"))


def test_tampered_ids_and_shard_manifest_are_detected(storage, exact_index, bucket_uri):
    exact_index.save(storage, bucket_uri)
    _flip_byte(storage, join_uri(bucket_uri, "shard-0000", "ids.parquet"), 100)
    with pytest.raises(IndexCorruptError, match="shard-0000, file ids.parquet"):
        ShardedIndex.load(storage, bucket_uri)
    exact_index.save(storage, bucket_uri)  # repair, then edit a shard manifest consistently with its files
    shard_json = join_uri(bucket_uri, "shard-0002", "shard.json")
    doc = json.loads(storage.read_bytes(shard_json))
    doc["self_recall"] = 0.5
    storage.write_bytes(shard_json, json.dumps(doc).encode())
    with pytest.raises(IndexCorruptError, match="shard-0002, file shard.json: sha256 does not match"):
        ShardedIndex.load(storage, bucket_uri)


def test_cache_dir_is_reused_and_repaired(storage, saved_ah, ah_index, queries, tmp_path):
    uri, _ = saved_ah
    ShardedIndex.load(storage, uri, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("shard-0000-*/ids.parquet")
    digest = sha256_file(cached)
    cached.write_bytes(b"garbage")  # a damaged cache entry is downloaded again, not trusted
    loaded = ShardedIndex.load(storage, uri, cache_dir=tmp_path)
    assert sha256_file(cached) == digest
    assert loaded.search(queries[:5], 10)[0] == ah_index.search(queries[:5], 10)[0]


def test_local_folder_roundtrip_and_refusals(storage, exact_index, small_catalog, tmp_path):
    ids, vectors = small_catalog
    root = tmp_path / "index" / "v7"
    exact_index.save(storage, str(root))
    loaded = ShardedIndex.load(storage, str(root))
    (got_ids, got_scores), (want_ids, want_scores) = loaded.search(vectors[:20], 7), exact_index.search(vectors[:20], 7)
    assert got_ids == want_ids and np.array_equal(got_scores, want_scores)
    (root / "_MANIFEST.json").unlink()  # without the index manifest, the shard folders are found
    assert ShardedIndex.load(storage, str(root)).num_items == 6_000
    (root / "shard-0001" / "vectors.npy").unlink()
    with pytest.raises(IndexCorruptError, match="shard-0001, file vectors.npy: missing"):
        ShardedIndex.load(storage, str(root))
    with pytest.raises(FileNotFoundError):
        ShardedIndex.load(storage, str(tmp_path / "nothing"))


def test_unlisted_pickle_next_to_a_searcher_is_refused(storage, ah_index, tmp_path):
    root = tmp_path / "v1"
    ah_index.save(storage, str(root))
    (root / "shard-0000" / "scann" / "scann_docids.pkl").write_bytes(b"not trusted")
    with pytest.raises(IndexCorruptError, match="scann/scann_docids.pkl: file not listed"):
        ShardedIndex.load(storage, str(root))


def test_per_shard_tasks_then_manifest_load_like_from_arrays(storage, small_catalog, bucket_uri):
    """The Ray job's path: each shard built and saved on its own, the manifest assembled afterwards."""
    ids, vectors = small_catalog
    cfg = IndexConfig(brute_force_below=1_000, exact_catalog_below=0, training_threads=1)
    parts = assign_shards(ids, 2)
    manifests = [build_and_save_shard(storage, bucket_uri, i, [ids[r] for r in rows], vectors[rows], cfg, len(ids))
                 for i, rows in reversed(list(enumerate(parts)))]  # finishing order does not matter
    write_index_manifest(storage, bucket_uri, make_index_manifest("v9", manifests, build_config=cfg,
                                                                   embedding_run="run-9"))
    loaded = ShardedIndex.load(storage, bucket_uri)
    in_memory = ShardedIndex.from_arrays(ids, vectors, cfg, num_shards=2)
    assert [s.params.mode for s in loaded.shards] == ["ah", "ah"]
    assert loaded.manifest.build_config["brute_force_below"] == 1_000
    got, want = loaded.search(vectors[:30], 10), in_memory.search(vectors[:30], 10)
    assert got[0] == want[0] and np.array_equal(got[1], want[1])


def test_tree_shard_with_soar_round_trips(storage, bucket_uri):
    """A spherical-tree shard with SOAR spilling (the default above 100k points) saves and loads back
    answering exactly as built."""
    from tessera.index import build_shard
    from tests.index.conftest import unit_rows

    x = unit_rows(np.random.default_rng(5), 6_000, 32)
    q = unit_rows(np.random.default_rng(6), 50, 32)
    cfg = IndexConfig(mode="tree_ah", training_threads=1)
    built = ShardedIndex([build_shard([f"i{r}" for r in range(len(x))], x, cfg)])
    p = built.shards[0].params
    assert p.spherical and p.soar_lambda == 1.5 and p.num_leaves == 77
    built.save(storage, join_uri(bucket_uri, "soar"))
    loaded = ShardedIndex.load(storage, join_uri(bucket_uri, "soar"))
    assert loaded.shards[0].params == p
    (a_ids, a_scores), (b_ids, b_scores) = built.search(q, 10), loaded.search(q, 10)
    assert a_ids == b_ids and np.array_equal(a_scores, b_scores)
