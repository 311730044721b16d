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
