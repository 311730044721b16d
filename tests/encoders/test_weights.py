"""Weights through the real S3 store: make_models writes them, encoders load them back via s3://."""

from __future__ import annotations

import json
import pickle
import shutil
import threading
import uuid

import numpy as np
import pytest

from jobs import make_models
from tessera.encoders import (
    AudioEncoder,
    AudioEncoderConfig,
    ImageEncoder,
    ImageEncoderConfig,
    MediaError,
    TextEncoderConfig,
    fetch_media,
    load_preprocessor,
    resolve_weights,
    weights_checksum,
)
from tessera.encoders.seeded import SEEDED_AUDIO_FOLDER, SEEDED_IMAGE_FOLDER
from tessera.storage import join_uri


@pytest.fixture(scope="module")
def models_uri(storage) -> str:
    """make_models run once against the S3 fixture (seed 0, like the local seeded_root)."""
    storage.ensure_bucket("s3://tessera-test")
    uri = f"s3://tessera-test/{uuid.uuid4().hex[:12]}/models/encoders"
    assert make_models.main(["--out", uri, "--seed", "0"]) == 0
    return uri


def test_make_models_writes_self_describing_folders(storage, models_uri, seeded_root):
    for folder in (SEEDED_IMAGE_FOLDER, SEEDED_AUDIO_FOLDER):
        names = {u.rsplit("/", 1)[1] for u in storage.list_files(join_uri(models_uri, folder))}
        assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md",
                "_MANIFEST.json"} <= names
        assert b"placeholder seeded weights" in storage.read_bytes(join_uri(models_uri, folder, "README.md"))
        manifest = storage.read_json(join_uri(models_uri, folder, "_MANIFEST.json"))
        assert manifest["seed"] == 0 and manifest["kind"] == "placeholder seeded weights"
        # same seed written elsewhere -> byte-identical weights
        assert manifest["checksum"] == weights_checksum(seeded_root / folder)


def test_make_models_keeps_identical_and_refuses_different_weights(models_uri):
    assert make_models.main(["--out", models_uri, "--seed", "0"]) == 0
    assert make_models.main(["--out", models_uri, "--seed", "1"]) == 1


def test_make_models_reads_the_storage_overrides_of_the_other_jobs(monkeypatch, capsys):
    """TESSERA__STORAGE__* reach make_models (it built StorageConfig() and ignored them: a MinIO endpoint set
    that way sent the weights to AWS); the other jobs' keys in the same environment are not its business."""
    cfg = make_models.storage_config({"TESSERA__STORAGE__ENDPOINT_URL": "http://minio.internal:9000",
                                      "TESSERA__STORAGE__MAX_ATTEMPTS": "3", "TESSERA__OUTPUT_URI": "s3://b/e"})
    assert cfg.endpoint_url == "http://minio.internal:9000" and cfg.max_attempts == 3
    assert make_models.main(["--out", "S3://tessera-test/never"]) == 2  # was a ValueError traceback (exit 1)
    assert "error: --out: unsupported URI scheme in 'S3://tessera-test/never'" in capsys.readouterr().err
    monkeypatch.setenv("TESSERA__STORAGE__MAX_ATTEMPTS", "0")
    assert make_models.main(["--out", "s3://tessera-test/never"]) == 2
    assert "environment variable TESSERA__STORAGE__MAX_ATTEMPTS" in capsys.readouterr().err


@pytest.mark.parametrize("encoder_cls, config_cls, folder, media", [
    (ImageEncoder, ImageEncoderConfig, SEEDED_IMAGE_FOLDER, "grocery_jpegs"),
    (AudioEncoder, AudioEncoderConfig, SEEDED_AUDIO_FOLDER, "fsdd_wavs"),
])
def test_s3_weights_load_identically_to_local(storage, models_uri, seeded_root, tmp_path, request,
                                              encoder_cls, config_cls, folder, media):
    raws = [p.read_bytes() for p in request.getfixturevalue(media)[:3]]
    common = {"device": "cpu", "bf16_autocast": False}
    remote = encoder_cls(config_cls(weights=join_uri(models_uri, folder), cache_dir=str(tmp_path), **common),
                         storage)
    local = encoder_cls(config_cls(weights=str(seeded_root / folder), **common))
    assert remote.weights_dir.is_relative_to(tmp_path)
    assert remote.weights_checksum == local.weights_checksum
    assert remote.dim == local.dim
    np.testing.assert_array_equal(remote.embed(raws), local.embed(raws))


def test_concurrent_resolution_downloads_once(storage, models_uri, tmp_path):
    uri = join_uri(models_uri, SEEDED_AUDIO_FOLDER)
    results, errors = [], []

    def resolve():
        try:
            results.append(resolve_weights(uri, storage, tmp_path))
        except OSError as err:
            errors.append(err)

    threads = [threading.Thread(target=resolve) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(r.fetched for r in results) == 1
    assert len({r.path for r in results}) == 1
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [results[0].path.name]
    again = resolve_weights(uri, storage, tmp_path)
    assert not again.fetched and again.path == results[0].path


def test_preprocessor_downloads_only_config_files(storage, models_uri, tmp_path, fsdd_wavs):
    cfg = AudioEncoderConfig(weights=join_uri(models_uri, SEEDED_AUDIO_FOLDER), cache_dir=str(tmp_path))
    prep = pickle.loads(pickle.dumps(load_preprocessor(cfg, storage)))
    clip = prep(fsdd_wavs[0].read_bytes())
    assert clip.dtype == np.float32 and len(clip) > 0
    names = {p.name for p in prep.weights_dir.iterdir()}
    assert {"config.json", "preprocessor_config.json"} <= names and "model.safetensors" not in names


def test_checksum_covers_weights_not_docs(image_weights, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(image_weights, copy)
    assert weights_checksum(copy) == weights_checksum(image_weights)
    (copy / "README.md").write_text("edited docs")
    assert weights_checksum(copy) == weights_checksum(image_weights)
    (copy / "preprocessor_config.json").write_text("{}")
    assert weights_checksum(copy) != weights_checksum(image_weights)


def test_packaged_text_weights_resolve_in_place():
    cfg = TextEncoderConfig()
    resolved = resolve_weights(cfg.weights)
    assert not resolved.fetched and (resolved.path / "model.safetensors").is_file()


def test_missing_weights_are_a_clear_error(storage, bucket_uri, tmp_path):
    with pytest.raises(FileNotFoundError, match="no weight files"):
        resolve_weights(join_uri(bucket_uri, "nothing-here"), storage, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_weights(str(tmp_path / "absent"))


def test_fetch_media_maps_storage_errors(storage, bucket_uri):
    uri = join_uri(bucket_uri, "media", "a.bin")
    storage.write_bytes(uri, b"x" * 100)
    assert fetch_media(storage, uri, max_bytes=100) == b"x" * 100
    with pytest.raises(MediaError) as err:
        fetch_media(storage, uri, max_bytes=99)
    assert err.value.kind == "oversized"
    with pytest.raises(MediaError) as err:
        fetch_media(storage, join_uri(bucket_uri, "media", "absent.bin"))
    assert err.value.kind == "missing"
    with pytest.raises(MediaError) as err:
        fetch_media(storage, "ftp://nowhere/x")
    assert err.value.kind == "missing"


@pytest.mark.parametrize("suffix", ["", "/", "/media/"])
def test_fetch_media_uri_naming_no_object_fails_the_item(storage, bucket_uri, suffix):
    # a bucket, or a "folder", is not an object: botocore refuses an empty key before any request
    # (ParamValidationError), which used to escape and fail the whole fetch task
    storage.write_bytes(join_uri(bucket_uri, "media", "a.bin"), b"x")
    bucket = bucket_uri.rstrip("/").split("/")[2]
    uri = f"s3://{bucket}{suffix}"
    with pytest.raises(MediaError) as err:
        fetch_media(storage, uri)
    assert err.value.kind == "missing"
    assert uri in str(err.value)


def test_fetch_media_in_an_absent_bucket_or_local_folder_fails_the_item(storage, tmp_path):
    for uri in ("s3://tessera-no-such-bucket-here/x.jpg", str(tmp_path)):
        with pytest.raises(MediaError) as err:
            fetch_media(storage, uri)
        assert err.value.kind == "missing"


def test_fetch_media_of_a_local_device_or_fifo_fails_the_item_without_reading_it(storage, tmp_path):
    """A local path's size said nothing for /dev/zero (0 bytes), which was then read until memory ran out;
    a FIFO would block the read forever."""
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for uri in ("/dev/zero", str(fifo)):
        with pytest.raises(MediaError) as err:
            fetch_media(storage, uri, max_bytes=1000)
        assert err.value.kind == "missing" and uri in str(err.value)


def test_media_error_pickles_and_validates_kind():
    err = pickle.loads(pickle.dumps(MediaError("truncated", "WAV data chunk declares 10 bytes, 2 present")))
    assert err.kind == "truncated" and str(err) == "truncated: WAV data chunk declares 10 bytes, 2 present"
    assert MediaError.missing("s3://b/k").kind == "missing"
    with pytest.raises(ValueError, match="unknown media error kind"):
        MediaError("weird")


def test_a_checkpoint_saved_in_fp16_runs_in_fp32(audio_weights, tmp_path, fsdd_wavs):
    # transformers 5 loads a checkpoint in the dtype it was saved in; the encoder holds fp32 weights
    # whatever the file stores (autocast alone decides the precision of the forward pass)
    import torch
    from safetensors.torch import load_file, save_file

    half = tmp_path / "audio-fp16"
    shutil.copytree(audio_weights, half)
    state = load_file(half / "model.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
              half / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((half / "config.json").read_text())  # as an fp16 release declares it
    config.pop("torch_dtype", None)
    config["dtype"] = "float16"
    (half / "config.json").write_text(json.dumps(config))
    cfg = dict(device="cpu", bf16_autocast=False, batch_size=4)
    enc = AudioEncoder(AudioEncoderConfig(weights=str(half), **cfg))
    assert {p.dtype for p in enc.model.parameters()} == {torch.float32}
    raws = [p.read_bytes() for p in fsdd_wavs]
    ref = AudioEncoder(AudioEncoderConfig(weights=str(audio_weights), **cfg)).embed(raws)
    cosine = (enc.embed(raws) * ref).sum(axis=1)
    assert cosine.min() > 0.999  # only the weights' fp16 rounding differs


@pytest.mark.parametrize("uri", ["s3://Bad_Bucket!/x.jpg", "s3://a bucket/x.jpg", "s3://{bucket}/" + "k" * 1100,
                                 "{tmp}/" + "n" * 300 + ".jpg", "{tmp}/a\0b.jpg", "/proc/self/mem"])
def test_fetch_media_malformed_or_unreadable_uri_fails_the_item(storage, bucket_uri, tmp_path, uri):
    """A bucket name S3 refuses, a key over its 1024 bytes, a local name over 255 bytes or holding a NUL,
    an unreadable file: each is this item's ``missing``, never an exception that fails the fetch task."""
    uri = uri.format(bucket=bucket_uri.rstrip("/").split("/")[2], tmp=tmp_path)
    with pytest.raises(MediaError) as err:
        fetch_media(storage, uri, max_bytes=1000)
    assert err.value.kind == "missing", err.value


def test_fetch_media_store_trouble_fails_the_job_not_the_item(storage, bucket_uri, monkeypatch):
    """Only the store's word on the URI fails the item: wrong credentials (403 SignatureDoesNotMatch) and a
    store that stops answering (botocore's timeouts are OSErrors) raise, so the job fails rather than
    writing every item as missing (a rerun would skip them as done)."""
    import socket

    from tessera.storage import Storage, StorageConfig

    uri = join_uri(bucket_uri, "media", "creds.bin")
    storage.write_bytes(uri, b"x" * 10)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    wrong = Storage(StorageConfig(endpoint_url=storage.endpoint_url, retry_window_s=0.5))
    with pytest.raises(Exception) as err:
        fetch_media(wrong, uri)
    assert not isinstance(err.value, MediaError), err.value
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        mute = Storage(StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1, retry_window_s=0.5,
                                     connect_timeout_s=0.5, request_timeout_s=0.5))
        with pytest.raises(OSError) as err:
            fetch_media(mute, "s3://b/k.jpg")
        assert not isinstance(err.value, MediaError) and "timeout" in type(err.value).__name__.lower(), err.value


def _changing_download(monkeypatch, storage, uri: str, times: int, replaced: str) -> list:
    """Make the first ``times`` downloads of ``uri`` see ``replaced`` rewritten in the store with other
    bytes (a real PUT, as an upload still in progress does) right after they read config.json, the
    first file: config.json itself has then been read already, a later file not yet."""
    from tessera.encoders import weights

    real, calls = weights._download, []

    def replacing(fs, src, dst):
        got = real(fs, src, dst)
        if calls.count("replaced") < times and dst.name == "config.json":
            old = json.loads(storage.read_bytes(join_uri(uri, replaced)))
            storage.write_bytes(join_uri(uri, replaced), json.dumps({**old, "_edit": "x" * len(calls)}).encode())
            calls.append("replaced")
        return got

    monkeypatch.setattr(weights, "_download", replacing)
    return calls


@pytest.mark.parametrize("replaced", ["config.json", "preprocessor_config.json"])
@pytest.mark.parametrize("times", [1, 3])
def test_weights_changed_while_downloading_are_not_cached(storage, models_uri, tmp_path, monkeypatch, times,
                                                          replaced):
    """A file replaced after it was read (found by listing again) or before (its size differs) makes the
    download start over; the cache never holds a mix of old and new files."""
    from tessera.encoders import weights

    uri = f"s3://tessera-test/{uuid.uuid4().hex[:12]}/changing"
    source = join_uri(models_uri, SEEDED_AUDIO_FOLDER)
    for rel in ("config.json", "preprocessor_config.json", "model.safetensors"):
        storage.write_bytes(join_uri(uri, rel), storage.read_bytes(join_uri(source, rel)))
    calls = _changing_download(monkeypatch, storage, uri, times, replaced)
    if times >= getattr(weights, "DOWNLOAD_ATTEMPTS", 3):
        with pytest.raises(getattr(weights, "WeightsChangedError", RuntimeError),
                           match=f"changed while they were downloaded.*{replaced}"):
            resolve_weights(uri, storage, tmp_path)
        assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
        return
    resolved = resolve_weights(uri, storage, tmp_path)
    assert resolved.fetched and calls == ["replaced"]
    for rel in ("config.json", "preprocessor_config.json", "model.safetensors"):
        assert (resolved.path / rel).read_bytes() == storage.read_bytes(join_uri(uri, rel)), rel
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [resolved.path.name]
    load_preprocessor(AudioEncoderConfig(weights=uri, cache_dir=str(tmp_path)), storage)  # the cached folder loads


def test_a_compressed_weight_file_is_cached_as_stored(storage, tmp_path):
    """pyarrow's input streams decompress files named .gz / .zst by default: a tokenizer shipped as .gz was
    cached decompressed (and, with the size check, refused as changed on every attempt)."""
    import gzip

    uri = f"s3://tessera-test/{uuid.uuid4().hex[:12]}/gz"
    packed = gzip.compress(b"x" * 1000)
    storage.write_bytes(join_uri(uri, "vocab.txt.gz"), packed)
    storage.write_bytes(join_uri(uri, "config.json"), b"{}")
    resolved = resolve_weights(uri, storage, tmp_path)
    assert (resolved.path / "vocab.txt.gz").read_bytes() == packed


def test_a_file_removed_after_the_listing_starts_the_download_over(storage, tmp_path, monkeypatch):
    from tessera.encoders import weights

    uri = f"s3://tessera-test/{uuid.uuid4().hex[:12]}/removed"
    for rel in ("a.json", "b.json", "c.json"):
        storage.write_bytes(join_uri(uri, rel), b"{}")
    real, removed = weights._download, []

    def removing(fs, src, dst):
        if dst.name == "a.json" and not removed:  # as `aws s3 sync --delete` would, between LIST and GET
            storage.delete(join_uri(uri, "b.json"))
            removed.append("b.json")
        return real(fs, src, dst)

    monkeypatch.setattr(weights, "_download", removing)
    resolved = resolve_weights(uri, storage, tmp_path)
    assert removed == ["b.json"] and sorted(p.name for p in resolved.path.iterdir()) == ["a.json", "c.json"]
