"""A decoder crash in the embedding job's decode stage fails its item, not the job.

Ray Data retries a map task whose worker died without end; a file that crashes the decoder would crash
every retry. ``map_guarded`` marks each batch in the cluster's KV store while it is preprocessed, and a
retry that finds the mark preprocesses item by item in a child process. The crash and the hang come
from ``tests.encoders.faulty`` (no real file known crashes this machine's decoders); the guard is what
is under test. The worker deaths and the retries are Ray's own."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tessera.encoders.errors import MediaError
from tessera.encoders.image import ImageEncoderConfig, ImagePreprocessor
from tests.encoders.faulty import FaultyImagePreprocessor


def _guarded(pre, raws, key, *timeouts):
    """``map_guarded`` in a Ray worker, and whether a decoding child process ran under it meanwhile."""
    import threading

    import psutil

    from tessera.embed import stages

    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            for child in psutil.Process().children():
                try:
                    if "tessera.encoders.isolated" in " ".join(child.cmdline()):
                        seen.add(child.pid)
                except psutil.Error:
                    pass
            done.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        return stages.map_guarded(pre, raws, key, *timeouts), bool(seen)
    finally:
        done.set()
        watcher.join()


@pytest.fixture(scope="module")
def jpegs(shared_data) -> list[bytes]:
    return [p.read_bytes() for p in sorted(Path(shared_data / "grocery").rglob("*.jpg"))[:2]]


def test_a_batch_whose_decoder_crashes_is_retried_item_by_item_and_only_the_bad_item_fails(
        ray_session, storage, encoder_weights, jpegs):
    import ray
    from ray.experimental import internal_kv

    pre = FaultyImagePreprocessor(ImageEncoderConfig(weights=encoder_weights["image"]), storage)
    task = ray.remote(num_cpus=0.25, max_retries=-1)(_guarded)  # as Ray Data runs its map tasks
    raws = [jpegs[0], b"CRASH: a file that kills the decoder", jpegs[1]]
    out, isolated = ray.get(task.remote(pre, raws, "test/crashing-batch"), timeout=300)
    expected = ImagePreprocessor(ImageEncoderConfig(weights=encoder_weights["image"]), storage).map([jpegs[0],
                                                                                                    jpegs[1]])
    assert isolated  # the retry took the isolated path
    assert np.array_equal(out[0], expected[0]) and np.array_equal(out[2], expected[1])
    assert isinstance(out[1], MediaError) and str(out[1]) == "corrupt: the decoder crashed on this input"
    assert not internal_kv._internal_kv_list("decoding/", namespace="tessera_embed")  # no mark left


def test_a_batch_whose_decoder_never_returns_ends_its_worker_and_its_retry_times_the_item_out(
        ray_session, storage, encoder_weights, jpegs):
    import ray

    pre = FaultyImagePreprocessor(ImageEncoderConfig(weights=encoder_weights["image"]), storage)
    task = ray.remote(num_cpus=0.25, max_retries=-1)(_guarded)
    t0 = time.monotonic()
    out, isolated = ray.get(task.remote(pre, [jpegs[0], b"HANG: a file the decoder loops on"], "test/hanging-batch",
                                        3.0, 3.0), timeout=300)
    assert isolated and not isinstance(out[0], MediaError)
    assert isinstance(out[1], MediaError) and str(out[1]) == "corrupt: decoding took over 3 s"
    assert time.monotonic() - t0 < 120  # not the item's hour


def test_a_batch_that_decodes_takes_the_plain_path_even_beside_another_jobs_mark(ray_session, storage,
                                                                                   encoder_weights, jpegs):
    """The mark is the Ray job's own: another job's live (or leaked) mark on the same batch changes nothing."""
    import ray
    from ray.experimental import internal_kv

    from tessera.embed.stages import clear_guard_marks

    internal_kv._internal_kv_put("decoding/ffffffff/test/plain-batch", b"1", namespace="tessera_embed")
    pre = ImagePreprocessor(ImageEncoderConfig(weights=encoder_weights["image"]), storage)
    out, isolated = ray.get(ray.remote(num_cpus=0.25)(_guarded).remote(pre, jpegs, "test/plain-batch"), timeout=120)
    assert not isolated and all(not isinstance(x, MediaError) for x in out)
    assert internal_kv._internal_kv_list("decoding/", namespace="tessera_embed") == [
        b"decoding/ffffffff/test/plain-batch"]
    job = ray.get_runtime_context().get_job_id()
    internal_kv._internal_kv_put(f"decoding/{job}/test/left-by-a-dead-batch", b"1", namespace="tessera_embed")
    assert clear_guard_marks() == 1  # this job's only
    internal_kv._internal_kv_del("decoding/ffffffff/test/plain-batch", namespace="tessera_embed")
