"""The embedding job on the real S3 store and a real Ray, over a corpus with every kind of bad item."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import embed as embed_job
from tessera.embed.config import EmbedConfig
from tessera.embed.output import committed_parts, list_parts
from tessera.embed.pipeline import check_fits, error_rate, run_embedding
from tessera.storage import join_uri
from tests.conftest import TEST_ROOT, embed_config

# what each deliberately broken item must come out as: (modality, error kind)
EXPECTED = {
    "corrupt_image": ("image", "corrupt"), "truncated_audio": ("audio", "truncated"),
    "empty_text": ("text", "empty"), "non_utf8_text": ("text", "not_utf8"),
    "missing_object": ("image", "missing"), "oversized_image": ("image", "oversized"),
    "wrong_format": ("image", "wrong_format"),
}


def _read_all(storage, uris):
    fs, _ = storage.filesystem(uris[0])
    return pa.concat_tables([pq.read_table(storage.filesystem(u)[1], filesystem=fs) for u in uris])


@pytest.fixture(scope="module")
def output(sample_embeddings, storage):
    return _read_all(storage, committed_parts(storage, sample_embeddings["output"]["uri"], sample_embeddings))


@pytest.fixture(scope="module")
def truth(sample_corpus, storage):
    return {r["item_id"]: r for r in _read_all(storage, storage.list_files(f"{TEST_ROOT}/truth/items")).to_pylist()}


def test_every_item_exactly_once_and_counts_add_up(sample_embeddings, output, truth):
    ids = output.column("item_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(truth) == sample_embeddings["input"]["items"]
    for m, c in sample_embeddings["counts"].items():
        assert c["ok"] + c["failed"] + c["missing"] == len(truth)
        assert c["failed"] == sum(c["errors"].values())
        assert c["ok"] == output.column(m).drop_null().length()
        assert c["missing"] == sum(1 for t in truth.values() if not t[f"has_{m}"])


def test_bad_items_fail_their_modality_only(output, truth):
    rows = {r["item_id"]: r for r in output.to_pylist()}
    seen = set()
    for iid, t in truth.items():
        if not t["bad_kind"]:
            continue
        modality, kind = EXPECTED[t["bad_kind"]]
        row = rows[iid]
        assert row[modality] is None and row[f"{modality}_error"].startswith(kind + ":") or \
            row[f"{modality}_error"] == kind, (iid, t["bad_kind"], row[f"{modality}_error"])
        others = [m for m in ("text", "image", "audio") if m != modality]
        assert all(row[m] is not None for m in others), (iid, "a bad item loses only its broken modality")
        seen.add(t["bad_kind"])
    assert seen == set(EXPECTED)


def test_vectors_unit_norm_and_absent_modalities_null(output, truth, sample_embeddings):
    for m, enc in sample_embeddings["encoders"].items():
        col = output.column(m)
        assert col.type == pa.list_(pa.float32(), enc["dim"])
        vecs = np.array(col.drop_null().to_pylist(), dtype=np.float32)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-3)
    for row in output.to_pylist():
        t = truth[row["item_id"]]
        for m in ("text", "image", "audio"):
            if not t[f"has_{m}"]:
                assert row[m] is None and row[f"{m}_error"] is None


def test_manifest_names_encoders_and_records_no_secret(sample_embeddings, storage, embedded_s3):
    run_uri = sample_embeddings["output"]["uri"]
    raw = storage.read_bytes(join_uri(run_uri, "_MANIFEST.json")).decode()
    assert embedded_s3.secret_access_key not in raw and embedded_s3.access_key_id not in raw
    for m, enc in sample_embeddings["encoders"].items():
        assert enc["weights_checksum"].startswith("sha256:") and enc["dim"] > 0 and enc["name"].startswith(m)
        # the pools' default allocator, as the actors found it in their own processes (Ray's jemalloc, preloaded)
        assert enc["allocators"] == ["jemalloc"], (m, enc)


def test_rerun_keeps_a_complete_run(sample_embeddings, encoder_weights):
    again = run_embedding(embed_config(encoder_weights, "session"))
    assert again.get("reused") and again["counts"] == sample_embeddings["counts"]


def test_resume_after_a_partial_run(sample_embeddings, encoder_weights, storage, output):
    """A run that died after writing some parts resumes: only the rest is embedded, nothing twice."""
    parts = list_parts(storage, sample_embeddings["output"]["uri"])
    assert len(parts) >= 3
    kept = parts[: len(parts) // 2]
    resumed_uri = join_uri(f"{TEST_ROOT}/embeddings", "resumed")
    for uri in kept:  # the state a killed run leaves: some whole parts, no manifest
        storage.write_bytes(join_uri(resumed_uri, uri.rsplit("/", 1)[1]), storage.read_bytes(uri))
    n_kept = sum(pq.read_metadata(storage.filesystem(u)[1], filesystem=storage.filesystem(u)[0]).num_rows
                 for u in kept)
    manifest = run_embedding(embed_config(encoder_weights, "resumed"))
    assert manifest["timings"]["resumed_from"] == n_kept
    assert manifest["timings"]["items_written_this_attempt"] == len(output) - n_kept
    assert manifest["counts"] == sample_embeddings["counts"]
    resumed = _read_all(storage, list_parts(storage, resumed_uri))
    assert sorted(resumed.column("item_id").to_pylist()) == sorted(output.column("item_id").to_pylist())
    first = {r["item_id"]: r for r in output.to_pylist()}
    for row in resumed.to_pylist():
        for m in ("text", "image", "audio"):
            a, b = row[m], first[row["item_id"]][m]
            assert (a is None) == (b is None)
            if a is not None:  # same model, same input: the same vector up to bf16 batch effects
                assert float(np.dot(a, b)) > 0.99


def test_max_error_rate_and_bad_config_exit_codes(sample_embeddings, encoder_weights, tmp_path, capsys):
    cfg = embed_config(encoder_weights, "session")
    path = tmp_path / "embed.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    assert error_rate(sample_embeddings) > 0
    assert embed_job.main(["--config", str(path), "--max-error-rate", "0"]) == 3
    out = capsys.readouterr()
    assert "above max_error_rate" in out.err and "corrupt" in out.out  # the error summary is printed
    assert embed_job.main(["--config", str(path), "--max-error-rate", "0.9"]) == 0
    path.write_text("image:\n  pool:\n    num_cpu: 1\n")
    assert embed_job.main(["--config", str(path)]) == 2
    assert "image.pool.num_cpu" in capsys.readouterr().err
    nowhere = cfg.model_copy(update={"items_uri": cfg.items_uri.rstrip("/") + "-absent/"})
    path.write_text(json.dumps(nowhere.model_dump(mode="json")))
    assert embed_job.main(["--config", str(path)]) == 2  # was a traceback and exit 1
    err = capsys.readouterr().err
    assert f"error ({path}): items_uri: no Parquet files under {nowhere.items_uri}" in err, err


def test_an_autoscaling_cluster_counts_what_its_autoscaler_may_add(ray_session):
    """cluster.yaml scales its GPU workers from zero: a GPU pool must not be refused for the GPUs the
    cluster has before the pool asks for them. Without an autoscaler (this test Ray) only what is there counts."""
    from tessera.ray_utils import autoscaler_max_resources, cluster_capacity

    assert autoscaler_max_resources() is None
    now = {"CPU": 4.0}
    assert cluster_capacity(now, None) == (4.0, 0.0)
    assert cluster_capacity(now, {"CPU": 4 + 6 * 16 + 4 * 4, "GPU": 4}) == (116.0, 4.0)
    cfg = embed_config({"image": "s3://b/w/image", "audio": "s3://b/w/audio"}, "x",
                       image={"pool": {"num_gpus": 1, "num_cpus": 1}})
    with pytest.raises(Exception, match="GPUs"):
        check_fits(cfg, *cluster_capacity(now, None))
    check_fits(cfg, *cluster_capacity(now, {"CPU": 116, "GPU": 4}))


def test_pools_that_cannot_fit_are_refused_before_running(encoder_weights):
    cfg = embed_config(encoder_weights, "x", image={"pool": {"num_cpus": 1.0, "min_actors": 2, "max_actors": 2}})
    with pytest.raises(ValueError, match="min_actors"):
        check_fits(cfg, cluster_cpus=2, cluster_gpus=0)
    gpu = embed_config(encoder_weights, "x", image={"pool": {"num_gpus": 1, "num_cpus": 0.25}})
    with pytest.raises(ValueError, match="GPUs"):
        check_fits(gpu, cluster_cpus=2, cluster_gpus=0)


def test_an_actor_no_node_can_hold_is_refused_whatever_the_cluster_holds_in_all(encoder_weights):
    """A node of 8 CPUs and one of 4 CPUs and a GPU hold both in all, but a pool actor asking for 6 CPUs and a
    GPU would wait forever: refused, naming the key; the same actor fits a node of 8 CPUs and a GPU, and on an
    autoscaling cluster (nodes None) is not judged by the nodes there now. An actor uses one GPU: more is a
    config error."""
    cfg = embed_config(encoder_weights, "x", image={"pool": {"num_gpus": 1, "num_cpus": 6}})
    split = [{"CPU": 8.0}, {"CPU": 4.0, "GPU": 1.0}]
    with pytest.raises(ValueError, match=r"image\.pool asks each of its workers for 6 CPUs and 1 GPUs, but no node"):
        check_fits(cfg, cluster_cpus=12, cluster_gpus=1, nodes=split)
    check_fits(cfg, cluster_cpus=12, cluster_gpus=1, nodes=[{"CPU": 8.0, "GPU": 1.0}, {"CPU": 4.0}])
    check_fits(cfg, cluster_cpus=12, cluster_gpus=1, nodes=None)
    with pytest.raises(ValueError, match="num_gpus"):
        embed_config(encoder_weights, "x", image={"pool": {"num_gpus": 2, "num_cpus": 0.25}})
    wide = embed_config(encoder_weights, "x", audio={"preprocess": {"num_cpus": 6}})
    with pytest.raises(ValueError, match=r"audio\.preprocess asks each of its workers for 6 CPUs"):
        check_fits(wide, cluster_cpus=16, cluster_gpus=0, nodes=[{"CPU": 4.0}] * 4)


def test_gpu_pools_hold_the_gpus(sample_corpus, encoder_weights, ray_session):
    """With logical GPUs in the cluster, each GPU pool's actors hold a GPU slot; text stays on CPU."""
    assert ray_session.cluster_resources().get("GPU") == 2
    gpu_pool = {"num_cpus": 0.25, "num_gpus": 1, "batch_size": 16, "torch_threads": 1}
    system = {"num_cpus": 0.25, "batch_size": 16, "torch_threads": 1, "allocator": "system"}
    cfg = embed_config(encoder_weights, "gpu", items_uri=f"{TEST_ROOT}/corpus/items/part-00000.parquet",
                       image={"pool": gpu_pool}, audio={"pool": gpu_pool}, text={"pool": system})
    manifest = run_embedding(cfg)
    for m in ("image", "audio"):
        assert manifest["encoders"][m]["devices"], m
        assert all("gpu_ids=" in d for d in manifest["encoders"][m]["devices"]), manifest["encoders"][m]
    assert all("gpu_ids" not in d for d in manifest["encoders"]["text"]["devices"])
    # no torch device behind logical GPUs: the actors fall back to the CPU and say so
    assert all(d.startswith("cpu") for d in manifest["encoders"]["image"]["devices"])
    # allocator per pool: the text pool asked for the system one and got no preload
    assert manifest["encoders"]["text"]["allocators"] == ["system"]
    assert manifest["encoders"]["image"]["allocators"] == ["jemalloc"]


def test_config_defaults_fit_the_embedded_stack():
    cfg = EmbedConfig()
    check_fits(cfg, cluster_cpus=2, cluster_gpus=0)


def test_media_blocks_keep_their_batch_size_when_only_some_keys_are_set():
    from tessera.embed.config import MEDIA_BATCH

    cfg = EmbedConfig.model_validate({"image": {"fetch": {"concurrency": 2}, "preprocess": {"concurrency": 1},
                                                "pool": {"num_cpus": 0.5}},
                                      "audio": {"fetch": {"batch_size": 8}}})
    assert cfg.image.fetch.batch_size == cfg.image.preprocess.batch_size == cfg.image.pool.batch_size == MEDIA_BATCH
    assert cfg.image.fetch.concurrency == 2 and cfg.image.pool.num_cpus == 0.5
    assert cfg.audio.fetch.batch_size == 8 and cfg.audio.pool.batch_size == MEDIA_BATCH


def test_each_items_file_is_read_by_its_own_task(sample_corpus, encoder_weights, storage):
    """The reader is not fused into the next stage: fused, Ray Data bundled as many files per task as
    the next stage's batch size, and one task read the whole corpus before anything moved on."""
    from tessera.embed.pipeline import build_dataset

    cfg = embed_config(encoder_weights, "read-tasks", image={"enabled": False}, audio={"enabled": False},
                       text={"preprocess": {"batch_size": 64}})
    files = storage.list_files(cfg.items_uri, ".parquet")
    assert len(files) >= 3
    ds = build_dataset(cfg, files, np.empty(0, np.uint64), "unused-key", join_uri(cfg.output_uri, cfg.run_id))
    assert sum(int(r["rows"]) for r in ds.iter_rows()) == sample_corpus["config"].num_items
    stats = ds.stats()
    read_ops = [line for line in stats.splitlines() if "read_items" in line and "tasks executed" in line]
    assert len(read_ops) == 1 and "->" not in read_ops[0], read_ops
    assert f": {len(files)} tasks executed" in read_ops[0], read_ops


def test_cpu_stages_do_not_import_the_models():
    """A read / fetch / write task's worker imports the stages module, not torch or the model libraries
    (each new worker process would pay seconds of CPU for them)."""
    import subprocess
    import sys

    code = ("import sys, tessera.embed.stages, tessera.encoders; from tessera.encoders import fetch_media, MediaError; "
            "print(sorted(m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_rerun_with_other_encoder_settings_is_refused_naming_the_keys(sample_embeddings, encoder_weights,
                                                                       storage, tmp_path, capsys):
    """A run id keeps the identity it started with: other encoder settings or items are refused (exit 2)
    instead of returning the finished run as if it matched, or mixing two kinds of vectors on resume."""
    run_uri = sample_embeddings["output"]["uri"]
    assert storage.read_json(join_uri(run_uri, "_RUN.json")) == sample_embeddings["identity"]
    cfg = embed_config(encoder_weights, "session")
    cfg.text.encoder.max_length = 64
    cfg.image.enabled = False
    cfg.audio.encoder.batch_size = 3  # speed only: not part of the identity
    path = tmp_path / "embed.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    before = list_parts(storage, run_uri)
    assert embed_job.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "encoders.text.max_length" in err and "encoders.image" in err and "batch_size" not in err
    assert str(path) in err and "another run_id" in err
    assert list_parts(storage, run_uri) == before
    # speed-only keys do not change the identity: the finished run is kept
    same = embed_config(encoder_weights, "session")
    same.text.encoder.batch_size, same.image.encoder.device = 7, "cpu"
    assert run_embedding(same)["reused"] is True


def _unchecked_strings(values: list[bytes | None]) -> pa.Array:
    """A string array holding these bytes as they are (invalid UTF-8 included, as other writers leave it)."""
    raw = pa.array(values, pa.binary())
    return pa.Array.from_buffers(pa.string(), len(raw), raw.buffers(), raw.null_count)


def test_a_media_uri_that_is_not_utf8_fails_its_item_not_the_block(storage, bucket_uri):
    """Text was read as bytes for this reason, the URI columns were not: one row written with a URI of
    invalid UTF-8 (by Spark or Go, which do not check) failed the read's block, and the job."""
    from tessera.embed.stages import fetch, read_items

    uri = join_uri(bucket_uri, "items", "part-00000.parquet")
    good = join_uri(bucket_uri, "media", "a.bin")
    storage.write_bytes(good, b"some bytes")
    fs, path = storage.filesystem(uri)
    pq.write_table(pa.table({"item_id": ["a", "b", "c", "d"], "image_uri": _unchecked_strings(
        [good.encode(), b"s3://x/\xff.jpg", None, b""])}), path, filesystem=fs)
    [table] = list(read_items({"uri": [uri]}, storage, ["item_id", "image_uri"], rows_per_batch=10))
    # "" is no object, as null is: absent (it was a failed item, kind missing, counted against max_error_rate)
    assert table.column("image_uri").to_pylist()[2:] == [None, None]
    [out] = list(fetch(table, "image", storage, max_bytes=1000, threads=2))
    assert out.column("image_bytes").to_pylist() == [b"some bytes", None, None, None]
    assert out.column("image_error").to_pylist() == [None, "missing: invalid URI: not UTF-8 (byte 7)", None, None]


def test_a_fetch_task_yields_blocks_bounded_by_bytes_every_item_once(storage, bucket_uri):
    """A fetch task held its whole batch of fetched objects (256 of up to 20 MB each), twice over; now it
    yields rows as their objects arrive, in blocks of about ``max_block_bytes``, each row with its own bytes
    or error and the vector columns of earlier pools beside it."""
    from tessera.embed.stages import fetch

    uris, expected = [], {}
    for n in range(10):
        uri = join_uri(bucket_uri, "fetch-blocks", f"{n}.bin")
        data = bytes([n]) * (1000 + n)
        storage.write_bytes(uri, data)
        uris.append(uri.encode())
        expected[f"i{n}"] = data
    uris[3], expected["i3"] = None, None  # no image
    uris[6], expected["i6"] = join_uri(bucket_uri, "fetch-blocks", "absent.bin").encode(), None
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(20, dtype=np.float32)), 2)
    table = pa.table({"item_id": [f"i{n}" for n in range(10)], "image_uri": pa.array(uris, pa.binary()),
                      "text_vector": vectors})
    blocks = list(fetch(table, "image", storage, max_bytes=5000, threads=3, max_block_bytes=2500))
    sizes = [sum(len(b or b"") for b in block.column("image_bytes").to_pylist()) for block in blocks]
    # a block closes once it holds 2500 bytes: at most the objects that arrived together (3 in flight) past it.
    # How many arrive together is the threads' timing, so the count of blocks is not fixed: the 8036 bytes
    # fetched exceed one block's bound, so there are at least two (one block of all of them is the old task)
    bound = 2500 + 3 * 1009
    assert all(size < bound for size in sizes) and len(blocks) >= 2 and sum(sizes) == 8036 > bound, sizes
    assert all(size >= 2500 for size in sizes[:-1]), sizes  # only the last block closes short
    out = pa.concat_tables(blocks)
    assert sorted(out.column("item_id").to_pylist()) == [f"i{n}" for n in range(10)]  # each once
    rows = {item: r for r, item in enumerate(out.column("item_id").to_pylist())}
    fetched, errors = out.column("image_bytes").to_pylist(), out.column("image_error").to_pylist()
    assert {item: fetched[r] for item, r in rows.items()} == expected
    assert errors[rows["i6"]].startswith("missing") and sum(e is not None for e in errors) == 1
    for item, r in rows.items():  # the vector columns travel with their rows
        n = int(item[1:])
        assert out.column("text_vector")[r].as_py() == [2.0 * n, 2.0 * n + 1], item
    assert [len(b) for b in fetch(table.slice(0, 0), "image", storage, 5000, 3)] == [0]


def test_items_files_with_differing_column_types_read_as_one_schema(storage, bucket_uri):
    """Parts written from pandas (a categorical item_id: dictionary<string>) beside parts written by Spark
    (string, large_string): the first batch joining blocks of both files failed the job ("Unable to merge:
    Field item_id has incompatible types"), as Arrow concatenates only equal types."""
    from tessera.embed.stages import read_items

    root = join_uri(bucket_uri, "mixed-types", "items")
    tables = [pa.table({"item_id": pa.array(["a", "b"]).dictionary_encode(), "text": ["x", "y"]}),
              pa.table({"item_id": pa.array(["c"], pa.large_string()), "text": pa.array(["z"], pa.large_string())}),
              pa.table({"item_id": ["d"], "text": pa.array(["w"]).dictionary_encode()})]
    uris = [join_uri(root, f"part-{n}.parquet") for n in range(len(tables))]
    for uri, table in zip(uris, tables, strict=True):
        storage.write_parquet(uri, table)
    blocks = list(read_items({"uri": uris}, storage, ["item_id", "text"], rows_per_batch=10))
    joined = pa.concat_tables(blocks)  # what Ray Data's batcher does
    assert joined.schema.field("item_id").type == pa.string() and joined.schema.field("text").type == pa.binary()
    assert joined.column("item_id").to_pylist() == ["a", "b", "c", "d"]
    assert joined.column("text").to_pylist() == [b"x", b"y", b"z", b"w"]


@pytest.mark.parametrize("case", ["null", "repeated_in_file", "repeated_across_files", "not_utf8"])
def test_items_with_null_or_repeated_ids_are_refused_before_any_work(case, encoder_weights, storage, tmp_path,
                                                                      capsys):
    items_uri = f"{TEST_ROOT}/bad-ids-{case}/items"
    tables = {"null": [["a", None, "b"]], "repeated_in_file": [["a", "b", "a"]],
              "repeated_across_files": [["a", "b"], ["c", "b"]], "not_utf8": [[b"a", b"\xffb"]]}[case]
    for i, ids in enumerate(tables):
        fs, p = storage.filesystem(join_uri(items_uri, f"part-{i:05d}.parquet"))
        column = _unchecked_strings(ids) if case == "not_utf8" else pa.array(ids, pa.string())
        pq.write_table(pa.table({"item_id": column, "text": ["a mug"] * len(ids),
                                 "image_uri": pa.nulls(len(ids), pa.string()),
                                 "audio_uri": pa.nulls(len(ids), pa.string())}), p, filesystem=fs)
    cfg = embed_config(encoder_weights, f"bad-ids-{case}", items_uri=items_uri)
    path = tmp_path / "embed.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    assert embed_job.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert {"null": "null item_id", "repeated_in_file": "repeated within the file: a",
            "repeated_across_files": "'b' is in both", "not_utf8": "not valid UTF-8"}[case] in err
    assert not storage.list_files(join_uri(cfg.output_uri, cfg.run_id))  # nothing written, not even _RUN.json


def test_cpu_pools_run_on_the_cpu_and_cuda_without_a_gpu_slot_is_refused(tmp_path):
    """Ray 2.60 leaves CUDA_VISIBLE_DEVICES unset in a worker without GPUs: an 'auto' encoder in a CPU pool
    would take a GPU it does not hold, so the actor pins it to the CPU; asking for cuda with no GPU in
    the pool is a config error that names the keys and the file."""
    from tessera.config import ConfigError, load_config
    from tessera.embed.stages import actor_encoder_config

    cfg = EmbedConfig()
    assert actor_encoder_config(cfg.text.encoder, []).device == "cpu"
    assert actor_encoder_config(cfg.text.encoder, [0]).device == "auto"
    pinned = cfg.image.encoder.model_copy(update={"device": "cpu"})
    assert actor_encoder_config(pinned, [1]).device == "cpu"
    path = tmp_path / "embed.yaml"
    path.write_text("audio:\n  encoder:\n    device: cuda\n")
    with pytest.raises(ConfigError, match="pool.num_gpus") as err:
        load_config(EmbedConfig, path)
    assert "audio" in str(err.value) and str(path) in str(err.value)
    path.write_text("audio:\n  encoder:\n    device: cuda\n  pool:\n    num_gpus: 1\n")
    assert load_config(EmbedConfig, path).audio.pool.num_gpus == 1
    path.write_text("audio:\n  enabled: false\n  encoder:\n    device: cuda\n")  # a disabled block is not checked
    assert not load_config(EmbedConfig, path).audio.enabled


def test_run_identity_names_weights_the_same_everywhere_and_tolerates_new_encoder_keys(encoder_weights, tmp_path):
    """The packaged MiniLM lives inside a virtualenv whose path differs between machines (a runtime-env
    virtualenv, another container): its identity is its files, not its path. An encoder key added to the
    code later must not make earlier runs look different; a modality switched on must."""
    import shutil

    from tessera.embed.pipeline import identity_changes, run_identity, weights_identity
    from tessera.encoders.text import packaged_minilm_path

    here = packaged_minilm_path()
    there = tmp_path / "elsewhere" / "model"
    shutil.copytree(here, there)
    assert weights_identity(here) == weights_identity(str(there)) != weights_identity(str(tmp_path))
    (there / "extra.bin").write_bytes(b"x")
    assert weights_identity(here) != weights_identity(str(there))
    assert weights_identity("s3://bucket/models/image") == "s3://bucket/models/image"

    old = run_identity(embed_config(encoder_weights, "x"), ["s3://b/items/part-0.parquet"], 10)
    new = json.loads(json.dumps(old))
    new["encoders"]["text"]["a_setting_added_later"] = 3
    del new["encoders"]["image"]["pooling"]
    assert identity_changes(old, new) == []
    new["encoders"]["text"]["max_length"] = 17
    fewer = json.loads(json.dumps(old))
    del fewer["encoders"]["audio"]
    assert identity_changes(old, new) == ["encoders.text.max_length"]
    assert identity_changes(fewer, old) == ["encoders.audio"]


def test_actors_of_one_pool_reporting_other_weights_fail_the_run(encoder_weights, storage):
    """Two actors of the text pool that loaded different weights (a node with another local folder, or
    weights replaced mid-run): the first one's checksum used to be kept and the mix written as one encoder."""
    from tessera.embed.pipeline import EmbeddingIntegrityError, encoder_identities

    cfg = embed_config(encoder_weights, "mixed")
    same = {"name": "text:minilm", "dim": 384, "weights_checksum": "aa", "weights": "w", "device": "cpu"}
    reported = [same | {"name": f"{m}:enc"} for m in cfg.modalities()]
    assert set(encoder_identities(cfg, storage, reported + [same])) == set(cfg.modalities())
    with pytest.raises(EmbeddingIntegrityError, match=r"text: the pool's actors loaded different weights \(aa and bb"):
        encoder_identities(cfg, storage, reported + [same | {"weights_checksum": "bb", "device": "cuda"}])


def test_a_run_found_mixed_is_never_completed_by_a_rerun(encoder_weights, storage, ray_session):
    """The attempt that found a pool's weights mixed writes _MIXED.json beside its parts: a rerun, finding
    every item done, would otherwise describe each encoder afresh (one checksum) and publish the mix."""
    from tessera.embed.pipeline import MIXED_FILE, EncoderMismatchError

    cfg = embed_config(encoder_weights, "mixed-run")
    run_uri = join_uri(cfg.output_uri, cfg.run_id)
    storage.write_json(join_uri(run_uri, MIXED_FILE), {"error": "text: the pool's actors loaded different weights"})
    with pytest.raises(EncoderMismatchError, match="different weights.*delete the run's folder"):
        run_embedding(cfg)
    assert not storage.exists(join_uri(run_uri, "_MANIFEST.json"))


def test_an_attempt_that_wrote_nothing_does_not_pin_the_run_identity(encoder_weights, storage, ray_session):
    """A weights prefix with a typo is refused before the run starts, naming the key. An attempt that
    started and failed before writing a part leaves ``_RUN.json`` behind (written here as such an attempt
    would); the corrected rerun under the same run id goes ahead (nothing to mix with) instead of being
    refused for its "other settings"."""
    from tessera.embed.pipeline import EmbeddingInputError, run_identity

    items = f"{TEST_ROOT}/identity/items"
    storage.write_parquet(join_uri(items, "part-0.parquet"), pa.table({
        "item_id": ["a", "b", "c"], "text": ["oat milk", "rye bread", "green tea"],
        "image_uri": [None, None, None], "audio_uri": [None, None, None]}))
    good = embed_config(encoder_weights, "identity", items_uri=items, output_uri=f"{TEST_ROOT}/identity/out",
                        audio={"enabled": False})
    typo = good.model_copy(deep=True)
    typo.image.encoder.weights = encoder_weights["image"].rstrip("/") + "-typo"
    run_uri = join_uri(good.output_uri, good.run_id)
    with pytest.raises(EmbeddingInputError, match=r"image.encoder.weights: no weight files under s3://.*-typo"):
        run_embedding(typo)
    assert not storage.exists(join_uri(run_uri, "_RUN.json"))
    other = good.model_copy(deep=True)
    other.text.encoder.max_length = 16
    storage.write_json(join_uri(run_uri, "_RUN.json"), run_identity(other, storage.list_files(items, ".parquet"), 3))
    manifest = run_embedding(good)
    assert manifest["counts"]["text"]["ok"] == 3 and manifest["input"]["items"] == 3
    assert storage.read_json(join_uri(run_uri, "_RUN.json")) == run_identity(good, storage.list_files(items,
                                                                                                      ".parquet"), 3)
    other_run = other.model_copy(update={"run_id": "identity"})
    with pytest.raises(EmbeddingInputError, match="started with other settings"):  # now it has parts: refused
        run_embedding(other_run)


def test_a_second_attempt_of_a_running_run_is_refused_before_it_reads_or_writes(sample_embeddings, encoder_weights,
                                                                                   storage, tmp_path, capsys):
    """Two attempts of one run at once would each write the items left when they started (duplicates): the
    second finds the first's lease and exits 5 naming it, having written nothing; a finished attempt leaves
    no lease behind."""
    from tessera.lease import RunLease

    run_uri = sample_embeddings["output"]["uri"]
    lease_uri = join_uri(run_uri, "_LEASE.json")
    assert not storage.exists(lease_uri)
    cfg = embed_config(encoder_weights, "held")
    held_uri = join_uri(cfg.output_uri, "held")
    path = tmp_path / "embed.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    with RunLease(storage, join_uri(held_uri, "_LEASE.json"), ttl_s=60, what="the first attempt"):
        assert embed_job.main(["--config", str(path)]) == 5
        err = capsys.readouterr().err
        assert f"{held_uri} is being written by another attempt (host" in err and "--break-lease" in err, err
        assert ", Ray job " in err, err  # this test session's driver
        assert storage.list_files(held_uri) == [join_uri(held_uri, "_LEASE.json")]  # no _RUN.json, no part


def test_break_lease_takes_a_live_looking_run_over_and_its_holder_learns_it(encoder_weights, storage, tmp_path,
                                                                            ray_session):
    """``--break-lease``: the operator knows the holder is gone; the run goes ahead and, were the holder still
    there, its next renewal finds the lease taken and it stops."""
    from tessera.lease import LeaseLostError, RunLease

    items = f"{TEST_ROOT}/breaklease/items"
    storage.write_parquet(join_uri(items, "part-0.parquet"), pa.table({
        "item_id": ["a", "b"], "text": ["oat milk", "rye bread"],
        "image_uri": [None, None], "audio_uri": [None, None]}))
    cfg = embed_config(encoder_weights, "breaklease", items_uri=items, output_uri=f"{TEST_ROOT}/breaklease/out",
                       image={"enabled": False}, audio={"enabled": False})
    path = tmp_path / "embed.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    run_uri = join_uri(cfg.output_uri, cfg.run_id)
    holder = RunLease(storage, join_uri(run_uri, "_LEASE.json"), ttl_s=60)
    holder.acquire()
    assert embed_job.main(["--config", str(path)]) == 5
    assert embed_job.main(["--config", str(path), "--break-lease"]) == 0
    assert storage.read_json(join_uri(run_uri, "_MANIFEST.json"))["counts"]["text"]["ok"] == 2
    assert not storage.exists(join_uri(run_uri, "_LEASE.json"))  # released by the run that took it
    holder.renew()
    with pytest.raises(LeaseLostError, match="deleted while this attempt ran"):
        holder.check()


def test_a_part_a_taken_over_attempt_wrote_late_is_deleted_and_one_after_the_manifest_is_not_read(
        encoder_weights, storage, monkeypatch, capsys, ray_session):
    """An attempt that lost its lease may still have part writes in flight. One landing after the new attempt
    listed what was done repeats items that attempt writes again: it is deleted once every one of its ids is
    found in the new attempt's parts, and the counts add up. One landing after the manifest is not in the
    manifest's list of parts, which every reader takes."""
    from tessera.embed import pipeline as pipeline_module
    from tessera.embed.output import MANIFEST
    from tessera.index_job.seeded_bundle import seeded_bundle
    from tessera.index_job.sources import resolve_sources
    from tessera.train.catalog import ItemCatalog
    from tessera.train.config import TrainConfig
    from tessera.train.datasets import _catalog_ids
    from tests.index_job.conftest import job_config

    root = f"{TEST_ROOT}/late"
    items = join_uri(root, "items")
    texts = ["oat milk", "rye bread", "green tea", "dark chocolate", "sea salt", "olive oil"]
    storage.write_parquet(join_uri(items, "part-0.parquet"), pa.table({
        "item_id": [f"i{j}" for j in range(6)], "text": texts,
        "image_uri": pa.nulls(6, pa.string()), "audio_uri": pa.nulls(6, pa.string())}))

    def config(run_id):
        return embed_config(encoder_weights, run_id, items_uri=items, output_uri=join_uri(root, "out"),
                            image={"enabled": False}, audio={"enabled": False}, write_batch_size=3)

    # the superseded attempt's parts: the same items through the same encoder, grouped its own way
    earlier = run_embedding(config("earlier").model_copy(update={"write_batch_size": 4}))
    late = committed_parts(storage, earlier["output"]["uri"], earlier)
    assert len(late) == 2
    run_uri = join_uri(root, "out", "taken")
    real_build = pipeline_module.build_dataset

    def build_then_late_write(*args, **kwargs):  # after this attempt listed the run's parts (none)
        storage.write_bytes(join_uri(run_uri, late[0].rsplit("/", 1)[1]), storage.read_bytes(late[0]))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "build_dataset", build_then_late_write)
    manifest = run_embedding(config("taken"))
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert f"1 part(s) of {run_uri} repeat items found in other parts" in out, out
    removed = late[0].rsplit("/", 1)[1]
    assert manifest["output"]["superseded_parts"] == [removed]
    assert manifest["counts"]["text"]["ok"] == 6 and manifest["output"]["rows"] == 6
    ours = list_parts(storage, run_uri)
    assert [u.rsplit("/", 1)[1] for u in ours] == manifest["output"]["files"] and len(ours) == 2
    assert removed not in manifest["output"]["files"]

    assert not storage.exists(join_uri(run_uri, removed))
    # a late part landing after the manifest: in the folder, not in the run
    storage.write_bytes(join_uri(run_uri, late[1].rsplit("/", 1)[1]), storage.read_bytes(late[1]))
    assert len(list_parts(storage, run_uri)) == 3
    assert committed_parts(storage, run_uri) == ours
    assert run_embedding(config("taken"))["reused"]
    assert sorted(ItemCatalog.load(storage, run_uri).item_ids) == [f"i{j}" for j in range(6)]
    train_cfg = TrainConfig.model_validate({"embeddings_uri": run_uri})
    assert _catalog_ids(train_cfg, storage).tolist() == [f"i{j}" for j in range(6)]
    bundle = join_uri(root, "bundle")
    seeded_bundle(storage.read_json(join_uri(run_uri, MANIFEST)), version="late", seed=0, out_dim=8).save(
        storage, bundle)
    sources = resolve_sources(job_config(bundle, join_uri(root, "index")), storage)
    assert sources.embedding_parts == ours and sources.num_items == 6


def test_a_late_part_holding_an_item_of_no_other_part_is_counted_and_fails_the_run(encoder_weights, storage,
                                                                                     monkeypatch, ray_session):
    """Only a part whose every item is in a part kept is left out: one holding anything else stays, so the
    tally names the repeats and the run fails (exit 4) without deleting anything or writing a manifest."""
    from tessera.embed import pipeline as pipeline_module
    from tessera.embed.output import vector_column, write_part
    from tessera.embed.pipeline import EmbeddingIntegrityError

    root = f"{TEST_ROOT}/late-foreign"
    items = join_uri(root, "items")
    storage.write_parquet(join_uri(items, "part-0.parquet"), pa.table({
        "item_id": ["a", "b"], "text": ["oat milk", "rye bread"],
        "image_uri": pa.nulls(2, pa.string()), "audio_uri": pa.nulls(2, pa.string())}))
    cfg = embed_config(encoder_weights, "foreign", items_uri=items, output_uri=join_uri(root, "out"),
                       image={"enabled": False}, audio={"enabled": False})
    run_uri = join_uri(cfg.output_uri, cfg.run_id)
    real_build = pipeline_module.build_dataset
    late = {}

    def build_then_late_write(*args, **kwargs):
        late["uri"] = write_part(storage, run_uri, pa.table({
            "item_id": ["a", "zz"], "text": vector_column([None, None], 384),
            "text_error": ["corrupt: late", "corrupt: late"]}), attempt="00000000")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "build_dataset", build_then_late_write)
    with pytest.raises(EmbeddingIntegrityError, match=r"holds 3 distinct items \(1 duplicate rows\) for 2 input"):
        run_embedding(cfg)
    assert storage.exists(late["uri"]) and not storage.exists(join_uri(run_uri, "_MANIFEST.json"))


def test_an_attempt_does_not_overwrite_a_manifest_written_while_it_ran(encoder_weights, storage, monkeypatch,
                                                                       ray_session):
    """Were an attempt to stall past its lease while another took the run over and finished it, its own
    manifest must not replace the other's: the write is conditional on the manifest it found."""
    from tessera.embed import pipeline as pipeline_module
    from tessera.lease import LeaseLostError

    root = f"{TEST_ROOT}/stalled"
    items = join_uri(root, "items")
    storage.write_parquet(join_uri(items, "part-0.parquet"), pa.table({
        "item_id": ["a"], "text": ["oat milk"], "image_uri": pa.nulls(1, pa.string()),
        "audio_uri": pa.nulls(1, pa.string())}))
    cfg = embed_config(encoder_weights, "stalled", items_uri=items, output_uri=join_uri(root, "out"),
                       image={"enabled": False}, audio={"enabled": False})
    manifest_uri = join_uri(cfg.output_uri, cfg.run_id, "_MANIFEST.json")
    real_build = pipeline_module.build_dataset

    def build_then_other_finishes(*args, **kwargs):
        storage.write_json(manifest_uri, {"written_by": "the attempt that took over"})
        return real_build(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "build_dataset", build_then_other_finishes)
    with pytest.raises(LeaseLostError, match="written by another attempt while this one ran"):
        run_embedding(cfg)
    assert storage.read_json(manifest_uri) == {"written_by": "the attempt that took over"}


def test_a_manifest_write_whose_answer_was_lost_counts_as_written(storage, bucket_uri):
    """A conditional write that landed but whose answer was lost is retried and refused: reading back this
    attempt's own bytes, the write counts as done; anything else there means another attempt wrote it."""
    from tessera.embed.pipeline import _write_manifest
    from tessera.lease import LeaseLostError

    uri = join_uri(bucket_uri, "run", "_MANIFEST.json")
    manifest = {"complete": True, "timings": {"total_s": 1.25}}
    _write_manifest(storage, uri, manifest, None)
    _write_manifest(storage, uri, manifest, None)  # as the refused retry of a landed write
    tag = storage.read_versioned(uri)[1]
    _write_manifest(storage, uri, {**manifest, "timings": {"total_s": 2.5}}, tag)  # over the version found
    with pytest.raises(LeaseLostError, match="written by another attempt"):
        _write_manifest(storage, uri, manifest, None)
    with pytest.raises(LeaseLostError, match="written by another attempt"):
        _write_manifest(storage, uri, manifest, tag)  # that version is gone
    assert storage.read_json(uri)["timings"]["total_s"] == 2.5


def test_parts_record_their_weights_and_a_mix_of_checksums_is_refused():
    """The closing check over the tally: every part's recorded checksum must be the encoder's; parts written
    before parts recorded weights (none recorded) pass. Parts of one other checksum are not a mix (an attempt
    that wrote nothing described weights replaced since): refused as changed weights, not marked mixed."""
    from tessera.embed.pipeline import EmbeddingInputError, EncoderMismatchError, check_parts_weights

    encoders = {"image": {"weights_checksum": "sha256:aa", "weights": "s3://b/m/image"}}
    check_parts_weights({}, encoders)
    check_parts_weights({"image": {"sha256:aa": "s3://b/run/part-1.parquet"}}, encoders)
    with pytest.raises(EmbeddingInputError, match=r"image.encoder.weights: s3://b/m/image holds weights sha256:aa, "
                                                  r"but this run's parts were encoded with sha256:bb"):
        check_parts_weights({"image": {"sha256:bb": "s3://b/run/part-2.parquet"}}, encoders)
    with pytest.raises(EncoderMismatchError, match=r"image: .*different weights \(sha256:aa and sha256:bb, for one "
                                                   r"in s3://b/run/part-2.parquet"):
        check_parts_weights({"image": {"sha256:aa": "s3://b/run/part-1.parquet",
                                       "sha256:bb": "s3://b/run/part-2.parquet"}}, encoders)


def test_a_run_resumed_after_its_weights_were_replaced_under_the_same_name_is_refused(
        encoder_weights, storage, shared_data, tmp_path, capsys, monkeypatch, ray_session):
    """The run identity names ``s3://`` weights by their URI, so a retrained model uploaded to the same prefix
    used to pass it, and a resumed run encoded its remaining items with another model than its written ones.
    Each part records the checksum of its weights: the resume exits 2 before any work, naming the key and
    both checksums, and goes ahead once the original weights are back. Weights replaced after that check
    (here: the check skipped) are caught by the closing tally: exit 4 and ``_MIXED.json``."""
    from tessera.embed import pipeline as pipeline_module
    from tessera.embed.output import MANIFEST, part_weights
    from tessera.embed.pipeline import MIXED_FILE, EncoderMismatchError
    from tessera.encoders import write_seeded_weights

    root = f"{TEST_ROOT}/replaced"
    photos = sorted(shared_data.glob("grocery/dataset/iconic-images-and-descriptions/Vegetables/**/*.jpg"))[:4]
    uris = [join_uri(root, "media", f"{j}.jpg") for j in range(len(photos))]
    for uri, photo in zip(uris, photos, strict=True):
        storage.write_bytes(uri, photo.read_bytes())
    items = join_uri(root, "items")
    storage.write_parquet(join_uri(items, "part-0.parquet"), pa.table({
        "item_id": [f"i{j}" for j in range(4)], "image_uri": uris}))
    models = join_uri(root, "models")
    weights = write_seeded_weights(models, storage, seed=0)

    def config(run_id):
        return embed_config(encoder_weights, run_id, items_uri=items, output_uri=join_uri(root, "out"),
                            write_batch_size=2, text={"enabled": False}, audio={"enabled": False},
                            image={"encoder": {"weights": weights["image"]}})

    first = run_embedding(config("run"))
    run_uri = first["output"]["uri"]
    checksum = first["encoders"]["image"]["weights_checksum"]
    parts = committed_parts(storage, run_uri, first)
    assert first["counts"]["image"]["ok"] == 4 and len(parts) == 2
    assert [part_weights(storage.read_parquet(p, ["item_id"])) for p in parts] == [{"image": [checksum]}] * 2
    mixed_uri = join_uri(root, "out", "mixed")
    storage.write_bytes(join_uri(mixed_uri, parts[0].rsplit("/", 1)[1]), storage.read_bytes(parts[0]))
    storage.delete(join_uri(run_uri, MANIFEST))  # the state a run killed after its first part leaves
    storage.delete(parts[1])

    write_seeded_weights(models, storage, seed=1, force=True)  # retrained: same names, same file sizes
    path = tmp_path / "embed.yaml"
    path.write_text(json.dumps(config("run").model_dump(mode="json")))
    assert embed_job.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"image.encoder.weights: {weights['image']} holds weights sha256:" in err
    assert f"encoded with {checksum}" in err and "changed since the run started" in err
    assert list_parts(storage, run_uri) == [parts[0]] and not storage.exists(join_uri(run_uri, MANIFEST))

    monkeypatch.setattr(pipeline_module, "check_resumed_weights", lambda *args: None)
    with pytest.raises(EncoderMismatchError, match=f"image: the run's parts were encoded with different weights "
                                                   f"\\(sha256:\\w+ and {checksum}"):
        run_embedding(config("mixed"))
    monkeypatch.undo()
    assert storage.exists(join_uri(mixed_uri, MIXED_FILE)) and not storage.exists(join_uri(mixed_uri, MANIFEST))

    write_seeded_weights(models, storage, seed=0, force=True)
    resumed = run_embedding(config("run"))
    assert resumed["timings"]["resumed_from"] == 2 and resumed["counts"] == first["counts"]
    assert resumed["encoders"]["image"]["weights_checksum"] == checksum
