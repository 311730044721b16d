"""The index job's shard split and builds on the session's real Ray and S3, over vectors parts written here.

Each vectors part is read by one split task; a shard's build task gets only its pieces (one per part).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tessera.index import IndexConfig, assign_shards, hash_ids, load_shard
from tessera.index_job.build import (
    IndexIntegrityError,
    IndexPlan,
    assemble_shard,
    build_shards,
    group_parts,
    plan_indexes,
    scan_ids,
    split_part,
    split_vectors,
)
from tessera.index_job.self_check import UserQueries
from tessera.index_job.synthetic import random_vectors_table
from tessera.index_job.vectors import STATUS_OK, matrix_column
from tessera.storage import join_uri
from tests.index_job.conftest import read_rows

DIM = 8
MODALITIES = ["text", "image"]


@pytest.fixture
def parts(storage, bucket_uri) -> list[str]:
    rng = np.random.default_rng(7)
    uris, first = [], 0
    for i, n in enumerate((120, 1, 75)):
        uri = join_uri(bucket_uri, "vectors", f"part-{i:04d}.parquet")
        storage.write_parquet(uri, random_vectors_table([f"item-{k:05d}" for k in range(first, first + n)], DIM, rng,
                                                        MODALITIES, share=0.6))
        uris.append(uri)
        first += n
    return uris


def planned(storage, parts, num_shards, modalities=MODALITIES):
    """The plans and the scan's rows per part."""
    scan = scan_ids(storage, parts, ["fused", *modalities])
    return plan_indexes(scan, num_shards, modalities), scan.part_rows


def expected_shards(storage, parts, plan) -> list[list[str]]:
    """The shards assign_shards makes of the index's ids, read whole (what the plan must reproduce)."""
    ids, _ = read_rows(storage, parts, plan.column)
    return [[ids[r] for r in rows] for rows in assign_shards(ids, plan.num_shards)]


@pytest.mark.parametrize(("num_shards", "min_piece_bytes", "tasks"), [(1, 0, 3), (3, 0, 3), (3, 1 << 20, 1)])
def test_each_shard_gets_its_rows_once_in_part_order(storage, parts, ray_session, num_shards, min_piece_bytes, tasks):
    """A split task a part (pieces of any size), or one for all three (their pieces would be under 1 MiB)."""
    import ray

    plans, part_rows = planned(storage, parts, num_shards)
    assert [p.name for p in plans] == ["fused", *MODALITIES]
    pieces = split_vectors(storage, plans, parts, part_rows, min_piece_bytes=min_piece_bytes).pieces
    assert len(pieces) == sum(p.num_shards for p in plans) and all(len(by_task) == tasks for by_task in pieces)
    t = 0
    for plan in plans:
        all_ids, all_vectors = read_rows(storage, parts, plan.column)
        row_of = {item: r for r, item in enumerate(all_ids)}
        shards = expected_shards(storage, parts, plan)
        assert plan.sizes == [len(s) for s in shards] and plan.num_shards == num_shards
        for s, members in enumerate(shards):
            ids, vectors = assemble_shard(tuple(ray.get(pieces[t])), len(members), "test")
            t += 1
            assert sorted(ids) == sorted(members), (plan.name, s)
            rows = [row_of[i] for i in ids]
            assert rows == sorted(rows)  # the order a read of the parts in order gives
            np.testing.assert_array_equal(vectors, all_vectors[rows])


@pytest.mark.parametrize("min_piece_bytes", [0, 1 << 20])  # three runs of parts, or one
def test_the_split_picks_out_the_sampled_rows_and_the_wanted_items(storage, parts, ray_session, min_piece_bytes):
    """Positions among each index's rows (in part order) and fused items by id come back from the runs
    in order, whichever run holds them: the item queries and the users' history items."""
    import ray

    from tessera.index_job.self_check import gather_rows

    plans, part_rows = planned(storage, parts, 2)
    every_id, every_vector = read_rows(storage, parts, "fused", index_only=False)  # the wanted ones come from here
    assert len(read_rows(storage, parts, "fused")[0]) < len(every_id)  # some items are not in the fused index
    rng = np.random.default_rng(5)
    samples = {p.name: np.sort(rng.choice(p.num_items, size=min(30, p.num_items), replace=False)) for p in plans}
    samples["image"] = np.array([0, plans[2].num_items - 1])  # the first and the last row
    fused_ids = set(read_rows(storage, parts, "fused")[0])
    outside = [i for i in every_id if i not in fused_ids][:3]  # no usable modality: a history still holds them
    wanted = sorted(rng.choice(sorted(fused_ids), size=22, replace=False).tolist() + outside + ["not-an-item"])
    split = split_vectors(storage, plans, parts, part_rows, min_piece_bytes=min_piece_bytes, samples=samples,
                          wanted=wanted)
    for plan in plans:
        ids, vectors = ray.get(ray.remote(gather_rows).remote(*split.samples[plan.name]))
        all_ids, all_vectors = read_rows(storage, parts, plan.column)
        assert ids == [all_ids[r] for r in samples[plan.name]], plan.name
        np.testing.assert_array_equal(vectors, all_vectors[samples[plan.name]])
    ids, vectors = gather_rows(*ray.get(split.wanted))
    rows = [r for r, item in enumerate(every_id) if item in set(wanted)]
    assert ids == [every_id[r] for r in rows] and len(ids) == 25 and set(outside) <= set(ids)
    np.testing.assert_array_equal(vectors, every_vector[rows])


def test_each_build_checks_its_shard_as_the_whole_index_would_be_checked(storage, parts, bucket_uri, ray_session):
    """The shards' recall shares, merged, are the recall of the saved index measured whole in one process
    (item queries with their own item excluded, and queries of no item)."""
    import ray

    from tessera.index import ShardedIndex, measure_recall
    from tessera.index_job.config import SelfCheckConfig
    from tessera.index_job.self_check import combine_checks, gather_rows, item_sample

    plans, part_rows = planned(storage, parts, 3, modalities=["text"])
    cfg = SelfCheckConfig(item_queries=40, k=5)
    samples = {p.name: item_sample(p.num_items, cfg) for p in plans}
    split = split_vectors(storage, plans, parts, part_rows, min_piece_bytes=0, samples=samples)
    items = {name: ray.remote(gather_rows).remote(*refs) for name, refs in split.samples.items()}
    users = np.random.default_rng(6).standard_normal((20, DIM)).astype(np.float32)
    all_ids, all_vectors = read_rows(storage, parts, "fused")
    unit = all_vectors / np.linalg.norm(all_vectors, axis=1, keepdims=True)  # cosine, as the index searches
    best = np.argsort(-(users @ unit.T), axis=1)
    seen = [[all_ids[r] for r in best[j, :j % 4]] for j in range(20)]  # 0-3 of each user's best items
    config = IndexConfig(mode="ah", num_neighbors=2, reorder_num_neighbors=2, training_threads=1)
    index_uri = join_uri(bucket_uri, "checked")
    built = build_shards(storage, plans, split.pieces, index_uri, config, num_cpus=0.5, check_k=cfg.k,
                         check_queries={"fused": (UserQueries(users, seen), items["fused"]),
                                        "text": (None, items["text"])})
    for plan in plans:
        checks = combine_checks([b.checks for b in built[plan.name]], cfg.k, {"item": "{n} items", "user": "{n}"})
        assert set(checks) == ({"item", "user"} if plan.name == "fused" else {"item"})
        assert all(b.check_seconds > 0 for b in built[plan.name])
        index = ShardedIndex.load(storage, join_uri(index_uri, plan.path) if plan.path else index_uri,
                                  require_manifest=False)
        ids, vectors = read_rows(storage, parts, plan.column)
        sample = samples[plan.name]
        whole = measure_recall(index, vectors[sample], ids, vectors, cfg.k, query_ids=[ids[r] for r in sample])
        assert checks["item"].recall == pytest.approx(whole.recall) and checks["item"].num_queries == len(sample)
        assert checks["item"].recall < 1.0  # AH without reordering depth: a figure that can be wrong
        if plan.name == "fused":
            excluding = measure_recall(index, users, ids, vectors, cfg.k, exclude=[set(s) for s in seen]).recall
            assert checks["user"].recall == pytest.approx(excluding) and checks["user"].seen_items_excluded
            # a check that dropped the exclusions would count each user's seen best items as found
            assert excluding != pytest.approx(measure_recall(index, users, ids, vectors, cfg.k).recall)


def test_builds_read_only_their_pieces(storage, parts, bucket_uri, ray_session):
    """The parts are deleted once split: the builds still make every shard, from their pieces."""
    import ray

    plans, part_rows = planned(storage, parts, 2)
    pieces = split_vectors(storage, plans, parts, part_rows, min_piece_bytes=0).pieces
    flat = [ref for by_part in pieces for ref in by_part]
    ready, _ = ray.wait(flat, num_returns=len(flat), timeout=120, fetch_local=False)
    assert len(ready) == len(flat)
    shards = {plan.name: expected_shards(storage, parts, plan) for plan in plans}  # read before the parts go
    for uri in parts:
        fs, path = storage.filesystem(uri)
        fs.delete_file(path)
        assert not storage.exists(uri)
    index_uri = join_uri(bucket_uri, "index")
    manifests = build_shards(storage, plans, pieces, index_uri, IndexConfig(), num_cpus=0.5)
    for plan in plans:
        uri = join_uri(index_uri, plan.path) if plan.path else index_uri
        assert [b.manifest.count for b in manifests[plan.name]] == plan.sizes
        for m, members in zip((b.manifest for b in manifests[plan.name]), shards[plan.name], strict=True):
            shard = load_shard(storage, join_uri(uri, m.name))
            assert sorted(shard.ids.tolist()) == sorted(members) and m.num_shards == 2


def test_one_shard_in_all_is_split_and_built(storage, parts, bucket_uri, ray_session):
    """Fused index only, one shard (the split task's returns: that shard's piece, the sample, the wanted rows)."""
    plans, part_rows = planned(storage, parts, 1, modalities=[])
    pieces = split_vectors(storage, plans, parts, part_rows, min_piece_bytes=0).pieces
    assert len(pieces) == 1 and len(pieces[0]) == 3
    manifests = build_shards(storage, plans, pieces, join_uri(bucket_uri, "index"), IndexConfig(), num_cpus=0.5)
    shard = load_shard(storage, join_uri(bucket_uri, "index", manifests["fused"][0].manifest.name))
    assert sorted(shard.ids.tolist()) == sorted(read_rows(storage, parts, "fused")[0])


def test_parts_are_grouped_in_order_until_every_piece_is_big_enough():
    plans = [IndexPlan("fused", "", "fused", [50, 50], [(1, "")]), IndexPlan("text", "modal/text", "text", [40], [])]
    parts = [f"p{k}" for k in range(6)]
    part_rows = {"fused": [30, 30, 30, 0, 10, 0], "text": [0, 40, 10, 20, 0, 5]}
    dims = {"fused": 4, "text": 4}  # 16 bytes a row
    # pieces of 400 bytes: fused needs 50 rows (2 shards), text 25 rows
    assert group_parts(parts, part_rows, plans, dims, min_piece_bytes=400) == [["p0", "p1"], ["p2", "p3", "p4", "p5"]]
    assert group_parts(parts, part_rows, plans, dims, min_piece_bytes=0) == [[p] for p in parts]
    # the group's bytes cap closes a run that an index could not fill
    assert group_parts(parts, part_rows, plans, dims, min_piece_bytes=1 << 30, max_group_bytes=1000) == [
        ["p0", "p1"], ["p2", "p3", "p4"], ["p5"]]  # 1600, 1120, then what is left


def test_a_shard_short_of_rows_and_an_indexed_row_without_a_vector_are_refused(storage, bucket_uri):
    ids, vectors = ["a", "b"], np.eye(2, DIM, dtype=np.float32)
    with pytest.raises(IndexIntegrityError, match="shard 0: found 2 of its 3 items"):
        assemble_shard(((ids, vectors),), 3, "s3://x shard 0")
    got, got_vectors = assemble_shard(((ids[:1], vectors[:1]), ([], vectors[:0]), (ids[1:], vectors[1:])), 2, "x")
    assert got == ids and np.array_equal(got_vectors, vectors)
    # a row marked ok (in the fused index) whose fused vector is null
    table = pa.table({"item_id": ids, "status": [STATUS_OK, STATUS_OK], "modalities": ["text", "text"],
                      "fused": matrix_column(vectors, np.array([True, False]))})
    uri = join_uri(bucket_uri, "bad.parquet")
    storage.write_parquet(uri, table)
    with pytest.raises(IndexIntegrityError, match="bad.parquet: 1 rows of the fused index without a fused vector"):
        split_part(storage, [uri], [IndexPlan("fused", "", "fused", [2], [])])


def test_scan_counts_distinct_items_from_hashes_and_finds_a_repeated_id(storage, bucket_uri, ray_session):
    rng = np.random.default_rng(3)
    uris = []
    for name, ids in (("a", ["x-1", "x-2", "x-3"]), ("b", ["x-4", "x-2"])):  # x-2 written twice
        uris.append(join_uri(bucket_uri, f"{name}.parquet"))
        storage.write_parquet(uris[-1], random_vectors_table(ids, DIM, rng, MODALITIES, share=1.0))
    scan = scan_ids(storage, uris, ["fused"])
    assert scan.rows == 5 and scan.distinct_items() == 4
    assert scan.ids_with_hashes({int(h) for h in hash_ids(["x-2", "x-4"])}) == ["x-2", "x-4", "x-2"]
    assert scan_ids(storage, uris[:1], ["fused"]).distinct_items() == 3


def test_a_build_whose_lease_was_taken_over_writes_no_shard(storage, parts, bucket_uri, ray_session):
    """A build's driver hung past its lease's ttl (or broken with --break-lease) while its tasks went on:
    its shards must not land over the new build's under the same names. Each task checks the lease
    between building and saving."""
    import pytest
    import ray

    from tessera.lease import LeaseLostError, RunLease

    plans, part_rows = planned(storage, parts, 1, modalities=[])
    index_uri = join_uri(bucket_uri, "index-taken")
    lease = RunLease(storage, join_uri(index_uri, "_LEASE.json"), ttl_s=60, what=f"index {index_uri}")
    lease.acquire()
    held = build_shards(storage, plans, split_vectors(storage, plans, parts, part_rows, min_piece_bytes=0).pieces,
                        index_uri, IndexConfig(), num_cpus=0.5, lease=lease.ref)  # still held: built and saved
    assert storage.exists(join_uri(index_uri, held["fused"][0].manifest.name, "shard.json"))
    storage.delete_prefix(join_uri(index_uri, held["fused"][0].manifest.name))
    RunLease(storage, lease.uri, ttl_s=60, break_lease=True).acquire()  # another build takes the version
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        build_shards(storage, plans, split_vectors(storage, plans, parts, part_rows, min_piece_bytes=0).pieces,
                     index_uri, IndexConfig(), num_cpus=0.5, lease=lease.ref)
    assert isinstance(err.value.cause, LeaseLostError) and "taken over by host" in str(err.value.cause)
    assert not storage.list_files(join_uri(index_uri, held["fused"][0].manifest.name))


def test_a_shard_tuned_into_rescoring_every_point_is_reported(tmp_path):
    """A shard whose tuning reached its recall target only with a reordering depth of its whole size searches
    as slowly as exact search, and nothing said so: the job now warns, naming the index and the shard."""
    import numpy as np

    from tessera.index import IndexConfig, ShardedIndex
    from tessera.index_job.job import exhaustive_shards
    from tessera.storage import Storage, StorageConfig

    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(400, 16)).astype(np.float32)
    index = ShardedIndex.from_arrays([f"i{j}" for j in range(400)], vectors,
                                     IndexConfig(mode="ah", training_threads=1), num_shards=2)
    manifests = index.save(Storage(StorageConfig()), str(tmp_path / "index")).shards
    assert all(m.params.mode == "ah" and m.params.reorder_num_neighbors < m.count for m in manifests)
    assert exhaustive_shards({"fused": manifests}) == []
    flat = manifests[1].model_copy(update={"params": manifests[1].params.model_copy(
        update={"reorder_num_neighbors": manifests[1].count})})
    [line] = exhaustive_shards({"fused": manifests[:1], "text": [flat]})
    assert line.startswith(f"text index, {flat.name} ({flat.count} points, ah): the recall target was reached only")
