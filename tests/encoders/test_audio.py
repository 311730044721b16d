"""Audio encoder on real spoken-digit WAVs (8 kHz) with the placeholder seeded Wav2Vec2 (16 kHz)."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest
import soundfile

from tessera.encoders import AudioEncoder, AudioEncoderConfig, AudioPreprocessor, MediaError
from tessera.encoders.audio_decode import decode_audio_bytes


@pytest.fixture(scope="module")
def audio_fp32(audio_weights) -> AudioEncoder:
    return AudioEncoder(AudioEncoderConfig(weights=str(audio_weights), device="cpu", bf16_autocast=False,
                                           batch_size=4))


@pytest.fixture(scope="module")
def recordings(fsdd_wavs) -> list[bytes]:
    return [p.read_bytes() for p in fsdd_wavs]


def _wav(samples: np.ndarray, rate: int, channels: int = 1) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def test_real_wavs_are_resampled_and_clipped(audio_fp32, recordings):
    prep = audio_fp32.preprocessor
    assert prep.sample_rate == 16000 and prep.clip_samples == 16000  # from preprocessor_config.json
    for raw in recordings:
        original = soundfile.info(io.BytesIO(raw))
        assert original.samplerate == 8000
        clip = prep(raw)
        assert clip.dtype == np.float32
        assert len(clip) == min(16000, original.frames * 2)  # 8 kHz -> 16 kHz, first second kept
        assert abs(float(clip.mean())) < 1e-3 and abs(float(clip.std()) - 1) < 1e-2  # do_normalize


def test_real_wavs_encode_to_distinct_unit_vectors(audio_fp32, recordings):
    vecs = audio_fp32.embed(recordings + recordings[:1])
    assert vecs.shape == (len(recordings) + 1, 256) and vecs.dtype == np.float32 and audio_fp32.dim == 256
    assert np.isfinite(vecs).all()
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vecs[0], vecs[-1], atol=1e-6)
    assert np.abs(vecs[0] - vecs[1]).max() > 1e-3


def test_vector_does_not_depend_on_batch_mates(audio_fp32, recordings):
    clips = audio_fp32.preprocessor.map(recordings)
    batched = audio_fp32.encode(clips)  # clips of different lengths, micro-batches of 4
    alone = np.concatenate([audio_fp32.encode([c]) for c in clips])
    np.testing.assert_allclose(batched, alone, atol=1e-4)


def test_stereo_44k_and_flac_decode(recordings):
    rng = np.random.default_rng(0)
    stereo = rng.uniform(-0.5, 0.5, (44100 // 2, 2))
    mono = decode_audio_bytes(_wav(stereo.reshape(-1), 44100, channels=2), 10**7, 16000)
    assert mono.shape == (8000,)  # 0.5 s at 16 kHz, channels averaged
    data, rate = soundfile.read(io.BytesIO(recordings[0]), dtype="float32")
    flac = io.BytesIO()
    soundfile.write(flac, data, rate, format="FLAC", subtype="PCM_16")
    np.testing.assert_allclose(decode_audio_bytes(flac.getvalue(), 10**7, 16000),
                               decode_audio_bytes(recordings[0], 10**7, 16000), atol=1e-6)


def test_max_pooling_and_longer_clips(audio_weights, recordings):
    enc = AudioEncoder(AudioEncoderConfig(weights=str(audio_weights), device="cpu", pooling="max",
                                          clip_seconds=0.5))
    assert enc.preprocessor.clip_samples == 8000
    vecs = enc.embed(recordings[:3])
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def _bad_inputs(wav: bytes, jpeg: bytes) -> dict[str, tuple[bytes | None, str]]:
    return {
        "truncated_wav": (wav[: 44 + (len(wav) - 44) // 5], "truncated"),
        "wav_cut_in_header": (wav[:30], "truncated"),
        "garbage_after_riff_header": (wav[:12] + np.random.default_rng(2).bytes(3000), "corrupt"),
        "random_bytes": (np.random.default_rng(1).bytes(3000), "corrupt"),
        "no_samples": (_wav(np.zeros(0), 8000), "empty"),
        "jpeg_at_audio": (jpeg, "wrong_format"),
        "text_at_audio": ("zero, one, two".encode(), "wrong_format"),
        "empty": (b"", "empty"),
        "none": (None, "missing"),
    }


@pytest.mark.parametrize("case", ["truncated_wav", "wav_cut_in_header", "garbage_after_riff_header",
                                  "random_bytes", "no_samples", "jpeg_at_audio", "text_at_audio", "empty", "none"])
def test_bad_audio_raises_media_error_of_kind(audio_weights, recordings, grocery_jpegs, case):
    prep = AudioPreprocessor(AudioEncoderConfig(weights=str(audio_weights)))
    raw, kind = _bad_inputs(recordings[2], grocery_jpegs[0].read_bytes())[case]
    with pytest.raises(MediaError) as err:
        prep(raw)
    assert err.value.kind == kind, str(err.value)


def test_oversized_audio(audio_weights, recordings):
    prep = AudioPreprocessor(AudioEncoderConfig(weights=str(audio_weights), max_bytes=1000))
    with pytest.raises(MediaError, match="oversized"):
        prep(recordings[0])


def test_sample_rate_must_agree_with_checkpoint(audio_weights, recordings):
    prep = AudioPreprocessor(AudioEncoderConfig(weights=str(audio_weights), sample_rate=22050))
    with pytest.raises(ValueError, match="disagrees"):
        prep(recordings[0])
