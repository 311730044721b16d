"""The index job on the session's real Ray and S3, over a real embedding run, with a seeded bundle."""

import re

import numpy as np
import pytest

from jobs.build_index import main
from tessera.index import FAILED_REPORT, INDEX_MANIFEST, IndexCorruptError, ShardedIndex, read_index_manifest
from tessera.index_job import IndexExistsError, IndexRecallError, run_index_job
from tessera.storage import join_uri
from tests.index_job.conftest import job_config, read_rows


@pytest.fixture(scope="module")
def built(bundle_uri, ray_session, storage):
    storage.ensure_bucket("s3://tessera-test")
    out = "s3://tessera-test/index-job/index"
    cfg = job_config(bundle_uri, out)
    return cfg, run_index_job(cfg), join_uri(out, "seeded-index")


def test_manifest_counts_and_self_check(built, sample_embeddings):
    _, manifest, _ = built
    n = sample_embeddings["output"]["rows"]
    counts = manifest.counts
    assert counts["input_items"] == n == counts["indexed"] + counts["excluded_no_modality"]
    # items without any usable modality are excluded and counted (the policy itself: test_vectors.py)
    assert counts["excluded_no_modality"] == counts["no_modality"]
    assert sum(counts[f"with_{m}"] for m in ("text", "image", "audio")) > counts["indexed"]
    assert manifest.num_items == counts["indexed"] and manifest.num_shards == 2
    assert abs(manifest.shards[0].count - manifest.shards[1].count) <= 1
    assert manifest.model_version == "seeded-index" and manifest.embedding_run == sample_embeddings["output"]["uri"]
    assert set(manifest.recall_checks) == {"user", "item"} and manifest.recall_floor == 0.95
    assert manifest.recall_checks["user"].num_queries > 10 and manifest.recall_checks["user"].seen_items_excluded
    assert "seen items excluded" in manifest.recall_checks["user"].queries
    assert manifest.recall_check.recall >= 0.95 and manifest.dim == 32
    assert manifest.recall_checks["item"].query_items_excluded and manifest.recall_checks["item"].tie_tolerance
    assert [s.num_shards for s in manifest.shards] == [2, 2]  # each shard.json records the shard count
    for m, ref in manifest.modal_indexes.items():
        assert ref.num_items == counts[f"with_{m}"] > 0
    assert set(manifest.modal_indexes) == {"text", "image", "audio"}


def test_loads_from_s3_and_answers(built, storage):
    cfg, manifest, uri = built
    index = ShardedIndex.load(storage, uri)
    ids, vectors = read_rows(storage, [join_uri(uri, p) for p in manifest.item_vectors], "fused")
    assert sorted(ids) == sorted(i for s in index.shards for i in s.ids)
    top, scores = index.search(vectors[:5], k=3)
    assert all(i in t for i, t in zip(ids[:5], top, strict=True)) and np.allclose(scores[:, 0], 1.0, atol=1e-4)
    top, _ = index.search(vectors[:1], k=3, exclude=[{ids[0]}])
    assert ids[0] not in top[0] and len(top[0]) == 3
    text = ShardedIndex.load(storage, join_uri(uri, manifest.modal_indexes["text"].path))
    assert text.manifest.modality == "text" and text.num_items == manifest.modal_indexes["text"].num_items
    # a shard damaged in storage is detected by its checksum
    shard = manifest.shards[1]
    name = next(iter(shard.files))
    target = join_uri(uri, shard.name, name)
    data = bytearray(storage.read_bytes(target))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(target, bytes(data))
    with pytest.raises(IndexCorruptError, match=f"{shard.name}.*{name}"):
        ShardedIndex.load(storage, uri)


def test_existing_version_is_refused(built, bundle_uri, bucket_uri, storage, tmp_path, capsys):
    cfg, _, _ = built
    with pytest.raises(IndexExistsError):
        run_index_job(cfg)
    config = tmp_path / "index.yaml"
    config.write_text(f"model_uri: {bundle_uri}\noutput_uri: {cfg.output_uri}\n")
    assert main(["--config", str(config)]) == 5
    assert main(["--config", str(config), "--keep-existing"]) == 0  # built from these inputs: kept
    assert "built from these inputs" in capsys.readouterr().out
    # the same version asked of another bundle (a copy, with one file's checksum as a retrain would change
    # it): --keep-existing kept the old model's index in service, exit 0; now exit 5 naming what differs
    other = join_uri(bucket_uri, "bundle-retrained")
    for uri in storage.list_files(bundle_uri):
        storage.write_bytes(join_uri(other, uri[len(bundle_uri.rstrip("/")) + 1:]), storage.read_bytes(uri))
    manifest = storage.read_json(join_uri(other, "_MANIFEST.json"))
    first = sorted(manifest["files"])[0]
    manifest["files"][first] = {**manifest["files"][first], "sha256": "0" * 64} \
        if isinstance(manifest["files"][first], dict) else "0" * 64
    storage.write_json(join_uri(other, "_MANIFEST.json"), manifest)
    config.write_text(f"model_uri: {other}\noutput_uri: {cfg.output_uri}\nversion: {cfg.version or 'seeded-index'}\n")
    assert main(["--config", str(config), "--keep-existing"]) == 5
    err = capsys.readouterr().err
    assert "built from other inputs" in err and "model_uri: " in err and "model_fingerprint: sha256:" in err, err
    config.write_text("num_shards: 0\n")
    assert main(["--config", str(config)]) == 2


def test_a_second_build_of_a_version_being_built_is_refused_before_any_write(built, bundle_uri, bucket_uri,
                                                                            storage, tmp_path, capsys):
    """Two builds of one version at once (a retried submit, a scheduler firing twice): the second used to
    rewrite the first one's shards under its published manifest. Now it exits 5 naming the build that holds
    the version, having written nothing; and a manifest is only ever written where there is none."""
    from tessera.index import write_index_manifest
    from tessera.lease import RunLease

    out = join_uri(bucket_uri, "index-twice")
    uri = join_uri(out, "seeded-index")
    config = tmp_path / "index.yaml"
    config.write_text(f"model_uri: {bundle_uri}\noutput_uri: {out}\n")
    with RunLease(storage, join_uri(uri, "_LEASE.json"), ttl_s=60, what=f"index {uri}"):  # the first build
        assert main(["--config", str(config)]) == 5
        err = capsys.readouterr().err
        assert f"index {uri}" in err and "--break-lease" in err  # a flag this job has
        assert storage.list_files(uri) == [join_uri(uri, "_LEASE.json")]
    assert not storage.list_files(uri)  # released
    manifest = built[1]
    write_index_manifest(storage, uri, manifest, exclusive=True)
    write_index_manifest(storage, uri, manifest, exclusive=True)  # its own, landed with its answer lost: written
    other = manifest.model_copy(update={"timings": {**manifest.timings, "total_s": -1.0}})
    with pytest.raises(FileExistsError, match="published by another build"):
        write_index_manifest(storage, uri, other, exclusive=True)


def test_an_embedding_run_of_other_widths_than_the_tower_is_an_input_error(bundle_uri, sample_embeddings, storage,
                                                                          ray_session, bucket_uri, tmp_path, capsys):
    """A run whose text vectors are wider than the tower reads (another encoder, checksums not recorded) was
    cut to the tower's width row by row, silently; now exit 6 before any work, naming the widths."""
    run = sample_embeddings["output"]["uri"].rstrip("/")
    copy = join_uri(bucket_uri, "emb-wider")
    for uri in storage.list_files(run):
        storage.write_bytes(join_uri(copy, uri[len(run) + 1:]), storage.read_bytes(uri))
    manifest = storage.read_json(join_uri(copy, "_MANIFEST.json"))
    width = manifest["encoders"]["text"]["dim"]
    manifest["encoders"]["text"]["dim"] = width + 8
    storage.write_json(join_uri(copy, "_MANIFEST.json"), manifest)
    config = tmp_path / "index.yaml"
    config.write_text(f"model_uri: {bundle_uri}\noutput_uri: {join_uri(bucket_uri, 'index-wider')}\n"
                      f"embeddings_uri: {copy}\n")
    assert main(["--config", str(config)]) == 6
    assert f"'text': ({width}, {width + 8})" in capsys.readouterr().err
    assert not storage.list_files(join_uri(bucket_uri, "index-wider"))
    # a run without a modality the model was trained on: every item counted as lacking it (those with
    # nothing else left out of the index, its own index dropped), exit 0; now exit 6 naming it
    manifest["encoders"]["text"]["dim"] = width
    del manifest["encoders"]["audio"]
    storage.write_json(join_uri(copy, "_MANIFEST.json"), manifest)
    assert main(["--config", str(config)]) == 6
    assert "has no audio vectors, which the model was trained on" in capsys.readouterr().err
    assert not storage.list_files(join_uri(bucket_uri, "index-wider"))


def test_pinned_scann_settings_no_shard_can_train_exit_2_naming_the_key_before_any_build(
        bundle_uri, ray_session, bucket_uri, storage, tmp_path, capsys):
    out = join_uri(bucket_uri, "index-leaves")
    config = tmp_path / "index.yaml"
    config.write_text(f"model_uri: {bundle_uri}\noutput_uri: {out}\nmodal_indexes: false\n"
                      "index: {mode: tree_ah, num_leaves: 60, training_sample_size: 55}\n")
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "index.num_leaves" in err and "training_sample_size=55" in err, err
    assert not [f for f in storage.list_files(out) if "/shard-" in f]  # no shard was built


def test_id_only_without_id_buckets_is_an_input_error(bundle_uri, ray_session, bucket_uri, tmp_path, capsys):
    config = tmp_path / "index.yaml"
    config.write_text(f"model_uri: {bundle_uri}\noutput_uri: {join_uri(bucket_uri, 'index-id-only')}\n"
                      "no_modality: id_only\n")
    assert main(["--config", str(config)]) == 6
    assert "no_modality: id_only needs an item tower with num_id_buckets" in capsys.readouterr().err


def test_an_interaction_log_that_is_not_there_fails_before_any_work(bundle_uri, ray_session, bucket_uri, tmp_path,
                                                                   capsys):
    config = tmp_path / "index.yaml"
    missing = join_uri(bucket_uri, "no-such-log")
    config.write_text(f"model_uri: {bundle_uri}\noutput_uri: {join_uri(bucket_uri, 'index-no-log')}\n"
                      f"interactions_uri: {missing}\n")
    assert main(["--config", str(config)]) == 6
    assert f"interactions_uri={missing} holds no Parquet parts" in capsys.readouterr().err


def test_fails_below_floor_with_a_clear_message(bundle_uri, ray_session, storage, bucket_uri):
    # AH shards with reordering pinned to k: approximate, so a floor of 1.0 cannot be met.
    cfg = job_config(bundle_uri, join_uri(bucket_uri, "index"), modal_indexes=False,
                     index={"mode": "ah", "reorder_num_neighbors": 10, "hash_type": "lut16"},
                     self_check={"recall_floor": 1.0})
    with pytest.raises(IndexRecallError, match=r"fused index, \w+ queries: recall@10 0\.\d+ < floor 1\.0") as err:
        run_index_job(cfg)
    uri = join_uri(bucket_uri, "index", "seeded-index")
    assert storage.exists(join_uri(uri, FAILED_REPORT)) and not storage.exists(join_uri(uri, INDEX_MANIFEST))
    assert err.value.report["manifest"]["recall_checks"]
    with pytest.raises(IndexCorruptError, match="failed"):
        ShardedIndex.load(storage, uri)
    with pytest.raises(FileNotFoundError):
        read_index_manifest(storage, uri)


def test_ah_shards_tune_on_user_vectors_outside_the_checked_sample(bundle_uri, ray_session, storage, bucket_uri,
                                                                   capsys):
    from tessera.index import hash_ids
    from tessera.index_job.self_check import select_users, user_queries
    from tessera.models.bundle import ModelBundle

    cfg = job_config(bundle_uri, join_uri(bucket_uri, "index-tuned"), modal_indexes=False,
                     index={"mode": "ah"}, self_check={"tuning_user_queries": 40})
    manifest = run_index_job(cfg)
    tuned = re.search(r"tuned on their own vectors and (\d+) user vectors", capsys.readouterr().out)
    assert tuned and 10 < int(tuned.group(1)) <= 40
    assert all(s.params.mode == "ah" and s.params.reorder_num_neighbors >= 100 for s in manifest.shards)
    assert manifest.recall_checks["user"].recall >= 0.95
    assert manifest.recall_checks["user"].num_queries == 40
    uri = join_uri(bucket_uri, "index-tuned", "seeded-index")
    users = select_users(storage, manifest.source["interactions_uri"], cfg.self_check, 40)  # whole histories
    assert len(users.check) == len(users.tuning) == 40
    assert not {h.user_id for h in users.check} & {h.user_id for h in users.tuning}
    # the users' vectors from every item's fused vector (read whole here; in the index or not) or from their
    # history items only
    ids, vectors = read_rows(storage, [join_uri(uri, p) for p in manifest.item_vectors], "fused", index_only=False)
    assert len(ids) == manifest.counts["input_items"]
    checked, tuning = user_queries(storage, bundle_uri, users, cfg.self_check, 1, (ids, vectors))
    row_of = {item: r for r, item in enumerate(ids)}
    wanted = [i for i in users.wanted() if i in row_of]
    assert 0 < len(wanted) < len(ids)
    only = user_queries(storage, bundle_uri, users, cfg.self_check, 1, (wanted, vectors[[row_of[i] for i in wanted]]))
    np.testing.assert_allclose(only[0].vectors, checked.vectors, atol=1e-6)
    np.testing.assert_allclose(only[1], tuning, atol=1e-6)
    # the job's histories: cut to the last events the tower reads, before the split gathers them
    limit = ModelBundle.load(storage, bundle_uri).user_tower.config.max_history
    cut = select_users(storage, manifest.source["interactions_uri"], cfg.self_check, 40, limit,
                       known=np.unique(hash_ids(ids)))
    assert max(len(h.items) for h in cut.check + cut.tuning) <= limit < max(len(h.items) for h in users.check)
    same = user_queries(storage, bundle_uri, cut, cfg.self_check, 1, (ids, vectors))
    np.testing.assert_allclose(same[0].vectors, checked.vectors, atol=1e-6)
    np.testing.assert_allclose(same[1], tuning, atol=1e-6)
    assert same[0].seen == checked.seen  # every item seen before the holdout, however short the history
    assert len(tuning) > 10 and len(checked) > 10
    same = np.isclose(tuning @ checked.vectors.T, 1.0, atol=1e-6)  # unit vectors: a shared user scores 1
    assert not same.any()


def test_one_shard_no_user_queries_and_every_item_a_query(bundle_uri, ray_session, storage, bucket_uri):
    """One shard an index, no user check nor tuning users (no log read), more item queries than items:
    every item of every index is a query, with its own item excluded."""
    cfg = job_config(bundle_uri, join_uri(bucket_uri, "index-one"), num_shards=1,
                     self_check={"user_queries": 0, "tuning_user_queries": 0, "item_queries": 100_000})
    manifest = run_index_job(cfg)
    assert manifest.num_shards == 1 and set(manifest.recall_checks) == {"item"}
    assert manifest.recall_checks["item"].num_queries == manifest.num_items
    assert manifest.timings["self_check_users_s"] == 0 and manifest.timings["self_check_s"] > 0
    uri = join_uri(bucket_uri, "index-one", "seeded-index")
    for name, ref in manifest.modal_indexes.items():
        modal = read_index_manifest(storage, join_uri(uri, ref.path))
        assert modal.num_shards == 1 and modal.recall_checks["item"].num_queries == ref.num_items, name


def test_resources_no_node_or_cluster_can_give_are_refused_naming_the_key():
    """A GPU vectors stage on a CPU cluster, actors holding every CPU (their read tasks never run) or one no
    node can hold made Ray Data wait forever (wait_for_min_actors_s is -1 in Ray 2.60); now exit 2 naming
    the key. An actor uses one GPU: more is refused by the config."""
    from tessera.config import ConfigError
    from tessera.index_job.job import check_fits

    gpu = job_config("s3://b/m", "s3://b/i", vectors={"num_gpus": 1})
    with pytest.raises(ConfigError, match=r"vectors.actors x vectors.num_gpus \(1 x 1\) is more than the cluster's 0"):
        check_fits(gpu, 2, 0, None)  # no autoscaler GPUs either
    with pytest.raises(ConfigError, match=r"vectors asks each of its workers for 0.5 CPUs and 1 GPUs"):
        check_fits(gpu, 2, 0, [{"CPU": 2.0}])
    check_fits(gpu, 2, 1, [{"CPU": 2.0, "GPU": 1.0}])
    with pytest.raises(ConfigError, match=r"vectors asks each of its workers for 0.5 CPUs and 1 GPUs, but no node"):
        check_fits(gpu, 4, 1, [{"CPU": 2.0}, {"CPU": 0.25, "GPU": 1.0}])
    check_fits(gpu, 4, 1, None)  # an autoscaling cluster: its node types, not its nodes now, bound an actor
    crowded = job_config("s3://b/m", "s3://b/i", vectors={"actors": 4})
    with pytest.raises(ConfigError, match=r"vectors.actors x vectors.num_cpus \(4 x 0.5\)"):
        check_fits(crowded, 2, 0, [{"CPU": 2.0}])
    with pytest.raises(ConfigError, match=r"build asks each of its workers for 4 CPUs"):
        check_fits(job_config("s3://b/m", "s3://b/i", build={"num_cpus": 4}), 8, 0, [{"CPU": 2.0}] * 4)
    with pytest.raises(ValueError, match="num_gpus"):
        job_config("s3://b/m", "s3://b/i", vectors={"num_gpus": 2})
