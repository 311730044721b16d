"""Preprocessor.map: one item's failure, expected or not, never fails the batch; setup errors do."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from tessera.encoders import AudioEncoderConfig, AudioPreprocessor, ImageEncoderConfig, ImagePreprocessor, MediaError
from tessera.encoders.base import Preprocessor


class Float32Preprocessor(Preprocessor[ImageEncoderConfig]):
    """A real, minimal preprocessor: raw little-endian float32 samples; numpy raises ValueError on a
    length that is not a multiple of 4, as a decoder library raises its own errors."""

    def __call__(self, raw: bytes) -> np.ndarray:
        if not raw:
            raise MediaError("empty", "zero bytes")
        return np.frombuffer(raw, dtype="<f4")


def test_unexpected_exception_fails_only_its_item_and_is_logged_once(tmp_path, caplog):
    prep = Float32Preprocessor(ImageEncoderConfig(weights=str(tmp_path)))
    good = np.array([1.5, -2.0], dtype="<f4").tobytes()
    with caplog.at_level(logging.WARNING, logger="tessera.encoders.base"):
        out = prep.map([good, b"\x00\x00\x80", b"", b"\x01\x02\x03\x04\x05", good])
    np.testing.assert_array_equal(out[0], [1.5, -2.0])
    np.testing.assert_array_equal(out[4], [1.5, -2.0])
    assert out[2].kind == "empty"
    for err in (out[1], out[3]):
        assert isinstance(err, MediaError) and err.kind == "corrupt"
        assert str(err).startswith("corrupt: unexpected ValueError: buffer size must be a multiple of element size")
    [record] = caplog.records  # two failures from the same place: one warning, with its traceback
    assert record.levelno == logging.WARNING and "ValueError" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ValueError


def test_oversized_allocation_in_one_item_does_not_fail_the_batch(tmp_path):
    class Allocating(Float32Preprocessor):  # one item asks for far more memory than any machine has
        def __call__(self, raw: bytes) -> np.ndarray:
            return np.empty(1 << 62, dtype=np.uint8) if raw == b"huge" else super().__call__(raw)

    out = Allocating(ImageEncoderConfig(weights=str(tmp_path))).map([b"huge", b"\x00\x00\x80\x3f"])
    assert out[0].kind == "corrupt" and "unexpected MemoryError" in str(out[0])
    np.testing.assert_array_equal(out[1], [1.0])


def test_setup_errors_fail_the_call_not_each_item(tmp_path, image_weights, audio_weights, grocery_jpegs):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "resnet"}))  # no preprocessor_config.json
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImagePreprocessor(ImageEncoderConfig(weights=str(tmp_path))).map([grocery_jpegs[0].read_bytes()])
    with pytest.raises(ValueError, match="disagrees"):
        AudioPreprocessor(AudioEncoderConfig(weights=str(audio_weights), sample_rate=22050)).map([b"RIFF"])
    [pixels] = ImagePreprocessor(ImageEncoderConfig(weights=str(image_weights))).map([grocery_jpegs[0].read_bytes()])
    assert pixels.shape == (3, 128, 128)
