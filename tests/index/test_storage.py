"""Saving to the real S3 store and loading back: identical results, manifests, checksum failures."""

import hashlib
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
    (root / "_MANIFEST.json").unlink()  # without the index manifest: refused unless asked for
    with pytest.raises(IndexCorruptError, match=r"file _MANIFEST\.json: missing .* 3 shard folder"):
        ShardedIndex.load(storage, str(root))
    assert ShardedIndex.load(storage, str(root), require_manifest=False).num_items == 6_000
    (root / "shard-0001" / "vectors.npy").unlink()
    with pytest.raises(IndexCorruptError, match="shard-0001, file vectors.npy: missing"):
        ShardedIndex.load(storage, str(root), require_manifest=False)
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


def _delete(storage, uri):
    fs, path = storage.filesystem(uri)
    fs.delete_file(path)


def test_index_without_its_manifest_is_refused_on_s3(storage, exact_index, small_catalog, bucket_uri):
    """A build still running (or stopped before its self-check published the manifest) never loads by default."""
    ids, vectors = small_catalog
    exact_index.save(storage, bucket_uri)
    _delete(storage, join_uri(bucket_uri, "_MANIFEST.json"))
    with pytest.raises(IndexCorruptError, match=r"file _MANIFEST\.json: missing under s3://.*require_manifest=False"):
        ShardedIndex.load(storage, bucket_uri)
    found = ShardedIndex.load(storage, bucket_uri, require_manifest=False)
    assert found.manifest is None and found.num_items == 6_000
    assert found.search(vectors[:5], 5)[0] == exact_index.search(vectors[:5], 5)[0]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_opt_in_load_detects_a_missing_last_shard(storage, exact_index, bucket_uri, tmp_path, where):
    uri = str(tmp_path / "v1") if where == "local" else bucket_uri
    manifest = exact_index.save(storage, uri)
    assert [s.num_shards for s in manifest.shards] == [3, 3, 3]
    assert read_index_manifest(storage, uri).shards[2].num_shards == 3
    _delete(storage, join_uri(uri, "_MANIFEST.json"))
    storage.delete_prefix(join_uri(uri, "shard-0002"))  # the last shard never written
    with pytest.raises(IndexCorruptError, match=r"shard-0002, file shard\.json: missing .* index of 3 shards"):
        ShardedIndex.load(storage, uri, require_manifest=False)
    with pytest.raises(IndexCorruptError, match="_MANIFEST.json: missing"):
        ShardedIndex.load(storage, uri)


def test_opt_in_load_of_shards_saved_without_a_shard_count(storage, exact_index, tmp_path):
    """shard.json files written before the count was recorded load as found (the count is unknown);
    mixed with shards that record one, they are refused as the leftovers of another build."""
    root = tmp_path / "v1"
    exact_index.save(storage, str(root))
    (root / "_MANIFEST.json").unlink()
    for i in range(3):
        path = root / f"shard-{i:04d}" / "shard.json"
        doc = json.loads(path.read_text())
        del doc["num_shards"]
        path.write_text(json.dumps(doc))
    assert ShardedIndex.load(storage, str(root), require_manifest=False).num_items == 6_000
    exact_index.save(storage, str(root))  # shard.json with counts again, manifest back
    doc = json.loads((root / "shard-0001" / "shard.json").read_text())
    del doc["num_shards"]
    (root / "shard-0001" / "shard.json").write_text(json.dumps(doc))
    (root / "_MANIFEST.json").unlink()
    with pytest.raises(IndexCorruptError, match=r"disagree on the number of shards.*shard-0001: unrecorded"):
        ShardedIndex.load(storage, str(root), require_manifest=False)


@pytest.mark.parametrize("unlisted", ["vectors.npy", "ids.parquet"])
def test_a_shard_manifest_that_does_not_list_a_file_the_loader_reads_is_refused(storage, exact_index, tmp_path,
                                                                                 unlisted):
    """Without the index manifest vouching for shard.json (require_manifest=False), a shard.json that
    leaves out a file the loader reads would have that file read unverified."""
    root = tmp_path / "v1"
    exact_index.save(storage, str(root))
    (root / "_MANIFEST.json").unlink()
    path = root / "shard-0001" / "shard.json"
    doc = json.loads(path.read_text())
    del doc["files"][unlisted]
    path.write_text(json.dumps(doc))
    (root / "shard-0001" / unlisted).write_bytes(b"not what was built")
    with pytest.raises(IndexCorruptError, match=f"shard-0001, file shard.json: does not list {unlisted}"):
        ShardedIndex.load(storage, str(root), require_manifest=False)


def test_rerun_into_the_same_local_folder_with_another_shard_mode_loads(storage, small_catalog, tmp_path):
    """An AH build, then a brute-force build of the same version into the same folder: the second
    replaces the shard folders whole, so no scann/ file of the first is left to be refused."""
    from tessera.index import build_shard, load_shard, save_shard

    ids, vectors = small_catalog
    root = tmp_path / "v1"
    ah = ShardedIndex.from_arrays(ids, vectors, IndexConfig(brute_force_below=1_000, exact_catalog_below=0,
                                                            training_threads=1), num_shards=3)
    assert [s.params.mode for s in ah.shards] == ["ah"] * 3
    ah.save(storage, str(root))
    assert (root / "shard-0000" / "scann" / "scann_assets.pbtxt").is_file()
    exact = ShardedIndex.from_arrays(ids, vectors, IndexConfig(), num_shards=2)  # fewer shards, too
    exact.save(storage, str(root))
    loaded = ShardedIndex.load(storage, str(root))
    assert [s.params.mode for s in loaded.shards] == ["brute_force"] * 2
    assert not (root / "shard-0000" / "scann").exists()
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    got, want = loaded.search(vectors[:20], 10), exact.search(vectors[:20], 10)
    assert got[0] == want[0] and np.array_equal(got[1], want[1])
    # shard-0002 of the first build is still there (only the manifest's shards are read); without the
    # manifest its recorded shard count gives it away
    (root / "_MANIFEST.json").unlink()
    with pytest.raises(IndexCorruptError, match=r"disagree .*shard-0000: 2, shard-0001: 2, shard-0002: 3"):
        ShardedIndex.load(storage, str(root), require_manifest=False)
    # the reviewer's repro: one shard saved as AH, then as brute force, in the same folder
    sub = [f"r{i}" for i in range(64)]
    first = build_shard(sub, vectors[:64], IndexConfig(mode="ah", tuning_queries=8, training_threads=1))
    save_shard(storage, str(tmp_path / "one"), first)
    save_shard(storage, str(tmp_path / "one"), build_shard(sub, vectors[:64], IndexConfig()))
    assert load_shard(storage, str(tmp_path / "one" / "shard-0000")).params.mode == "brute_force"


def test_modal_manifest_checksum_is_verified(storage, exact_index, bucket_uri):
    from tessera.index.shard_io import manifest_bytes

    uri = join_uri(bucket_uri, "modal", "text")
    manifest = exact_index.save(storage, uri)
    good = hashlib.sha256(manifest_bytes(manifest)).hexdigest()
    assert read_index_manifest(storage, uri, expected_sha256=good) == manifest
    doc = json.loads(storage.read_bytes(join_uri(uri, "_MANIFEST.json")))
    doc["embedding_run"] = "another-run"  # still a valid manifest: only its checksum tells
    storage.write_bytes(join_uri(uri, "_MANIFEST.json"), json.dumps(doc).encode())
    with pytest.raises(IndexCorruptError, match=r"file s3://.*/modal/text/_MANIFEST\.json: sha256 mismatch"):
        read_index_manifest(storage, uri, expected_sha256=good)
