"""The encoder pool's actor class, called in this process on real weights (no Ray Data around it)."""

import numpy as np
import pyarrow as pa

from tessera.embed.stages import EncodeActor, pack_array
from tessera.encoders.image import ImageEncoder, ImageEncoderConfig


def test_a_non_finite_vector_fails_its_item_and_is_never_stored(encoder_weights, storage, ray_session):
    """A model that returns NaN (here the real placeholder image model fed a NaN pixel; in practice an fp16
    overflow) must not store the NaN vector as ``ok``: the item's image fails as ``corrupt``, its
    neighbours in the batch keep their vectors."""
    actor = EncodeActor("image", ImageEncoder, ImageEncoderConfig(weights=encoder_weights["image"], device="cpu"),
                        storage, torch_threads=1)
    good = np.random.default_rng(0).standard_normal((3, 128, 128)).astype(np.float32)
    bad = good.copy()
    bad[0, 5, 5] = np.nan
    table = pa.table({"item_id": ["a", "b", "c", "d"],
                      "image_input": pa.array([pack_array(good), pack_array(bad), None, pack_array(good)], pa.binary()),
                      "image_error": pa.array([None, None, "truncated: cut short", None], pa.string())})
    out = actor(table).to_pydict()
    assert [v is not None for v in out["image"]] == [True, False, False, True]
    assert out["image_error"][1].startswith("corrupt: the encoder's output is not finite")
    assert out["image_error"][2] == "truncated: cut short" and out["image_error"][0] is None
    assert np.allclose(np.linalg.norm(np.array(out["image"][0])), 1.0, atol=1e-3)


def test_a_decode_task_sizes_the_tokenizer_s_thread_pool_from_its_cpus(ray_session, storage):
    """The tokenizers library's rayon pool took every core of the node in a task that holds a fraction of a
    CPU; decode() sizes it from the task's CPUs (a fresh worker process each: the pool is per process)."""
    import os
    import uuid

    import pyarrow as pa

    from tessera.embed.stages import decode
    from tessera.encoders.text import TextEncoderConfig

    def run(table):
        out = decode(table, "text", TextEncoderConfig(), storage)  # the packaged MiniLM
        return os.environ.get("RAYON_NUM_THREADS"), out.column("text_error").to_pylist()

    table = pa.table({"item_id": ["a", "b"], "text": ["a ceramic mug", "   "]})
    for cpus, expected in ((0.25, "1"), (1.5, "2")):
        fresh = {"env_vars": {"TESSERA_TEST_FRESH_WORKER": uuid.uuid4().hex}}
        threads, errors = ray_session.get(
            ray_session.remote(run).options(num_cpus=cpus, runtime_env=fresh).remote(table), timeout=120)
        assert threads == expected and errors[0] is None and errors[1].startswith("empty"), (cpus, threads, errors)
