"""Audio encoder on real spoken-digit WAVs (8 kHz) with the placeholder seeded Wav2Vec2 (16 kHz)."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional as AF

from tessera.encoders import AudioEncoder, AudioEncoderConfig, AudioPreprocessor, MediaError
from tessera.encoders.audio_decode import _read_mono, decode_audio_bytes, resample_ratio


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


# --- work and memory bounded by the clip, whatever the header declares ---


def _encode(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=fmt, subtype=subtype)
    return out.getvalue()


@pytest.fixture(scope="module")
def speech(fsdd_wavs) -> np.ndarray:
    """2.3 s of real speech at 8 kHz: the six recordings one after the other."""
    return np.concatenate([soundfile.read(p, dtype="float32")[0] for p in fsdd_wavs])


@pytest.mark.parametrize("rate", [1, 999, 768_001, 2_000_000])
def test_implausible_sample_rate_is_corrupt(audio_weights, rate):
    # a 400 KB WAV saying 1 Hz resampled to 16 kHz was 3.2 G samples (12.8 GB)
    prep = AudioPreprocessor(AudioEncoderConfig(weights=str(audio_weights)))
    [err] = prep.map([_encode(np.zeros(200_000, np.int16), rate)])
    assert isinstance(err, MediaError) and err.kind == "corrupt"
    assert f"sample rate of {rate} Hz, outside 1000..768000 Hz" in str(err)


def test_only_the_frames_the_clip_needs_are_decoded(audio_weights, speech):
    prep = AudioPreprocessor(AudioEncoderConfig(weights=str(audio_weights)))
    # two minutes of 48 kHz silence: ~50 KB of FLAC, 23 MB of float32 once decoded
    [silence] = prep.map([_encode(np.zeros(48_000 * 120, np.int16), 48_000, "FLAC")])
    assert isinstance(silence, np.ndarray) and silence.shape == (16000,)
    # non-finite samples 2 s in: the full decode refuses the file, the clip never reaches them
    tail = np.concatenate([speech[:16000], np.full(8000, np.nan, np.float32)])
    raw = _encode(tail, 8000, subtype="FLOAT")
    with pytest.raises(MediaError, match="non-finite"):
        decode_audio_bytes(raw, 10**7, 16000)
    finite = decode_audio_bytes(_encode(speech[:16000], 8000, subtype="FLOAT"), 10**7, 16000)  # (32000,)
    np.testing.assert_allclose(decode_audio_bytes(raw, 10**7, 16000, max_samples=16000), finite[:16000],
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("rate, channels", [(8000, 1), (11025, 1), (44100, 2), (48000, 2)])
@pytest.mark.parametrize("clip_samples", [4000, 16000, 40000])
def test_clip_is_the_start_of_the_full_decode(speech, rate, channels, clip_samples):
    """Real speech at common rates: decoding only the clip's frames gives the full decode's first samples."""
    wave = AF.resample(torch.from_numpy(speech), 8000, rate).numpy() * 0.9 if rate != 8000 else speech
    raw = _encode(np.stack([wave, -0.5 * wave], axis=1) if channels == 2 else wave, rate)
    whole = decode_audio_bytes(raw, 10**8, 16000)
    clip = decode_audio_bytes(raw, 10**8, 16000, max_samples=clip_samples)
    assert clip.shape == (min(clip_samples, len(whole)),)
    np.testing.assert_allclose(clip, whole[:clip_samples], rtol=0, atol=1e-6)  # float32 rounding of the sinc


def test_preprocessed_clip_matches_full_decode_on_real_recordings(audio_weights, recordings):
    prep = AudioPreprocessor(AudioEncoderConfig(weights=str(audio_weights), clip_seconds=0.25))
    for raw in recordings:
        full = decode_audio_bytes(raw, 10**7, 16000)[:4000]
        expected = (full - full.mean()) / np.sqrt(full.var() + 1e-7)  # do_normalize
        np.testing.assert_allclose(prep(raw), expected, rtol=0, atol=1e-5)


def test_rate_pairs_without_a_small_ratio_resample_at_bounded_cost():
    assert resample_ratio(44100, 16000) == (441, 160) and resample_ratio(8000, 16000) == (1, 2)  # exact
    orig, new = resample_ratio(44101, 16000)  # exact: 16000/44101, a 700 M-tap filter bank
    assert new * (2 * 20 + orig) < 2 * 1024 * 1024 and abs(new / orig * 44101 / 16000 - 1) < 1e-5
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(int(1.5 * 44101)) / 44101)  # 440 Hz, 1.5 s
    clip = decode_audio_bytes(_encode(tone, 44101), 10**7, 16000, max_samples=16000)
    assert clip.shape == (16000,)
    assert np.argmax(np.abs(np.fft.rfft(clip))) == 440  # 1 Hz bins: still 440 Hz at 16 kHz


def test_a_file_shorter_than_its_header_says_yields_only_its_own_samples():
    """A cut MP3 keeps its Xing header's length; reading it in reused blocks returned the real samples
    followed by stale buffer memory (another item's audio, or NaN). Only the decodable samples come back
    from ``_read_mono`` (``decode_audio_bytes`` refuses such a file as ``truncated`` before decoding)."""
    def mp3(x):
        return _encode(x.astype(np.float32), 44100, "MP3", "MPEG_LAYER_III")

    def read(raw):
        with soundfile.SoundFile(io.BytesIO(raw)) as f:
            return _read_mono(f, 44100)  # more than the cut holds

    tone = mp3(0.1 * np.sin(2 * np.pi * 300 * np.arange(int(0.6 * 44100)) / 44100))
    cut = tone[: len(tone) * 3 // 4]
    readable = len(soundfile.read(io.BytesIO(cut), dtype="float32")[0])
    assert soundfile.info(io.BytesIO(cut)).frames > readable  # the header promises more than is there
    loud = mp3(0.9 * np.random.default_rng(5).standard_normal(44100 * 2))
    outs = []
    for _ in range(3):
        read(loud)
        outs.append(read(cut))
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    assert len(outs[0]) == readable and np.abs(outs[0]).max() < 0.2
    with pytest.raises(MediaError, match="truncated"):
        decode_audio_bytes(cut, 10**8, 16000, max_samples=16000)


def _compressed(speech: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    wave = AF.resample(torch.from_numpy(speech), 8000, rate).numpy() * 0.9 if rate != 8000 else speech
    return _encode(np.tile(wave, 2), rate, fmt, subtype)


@pytest.mark.parametrize("fmt, subtype, rate", [("MP3", None, 44100), ("MP3", None, 16000), ("MP3", None, 8000),
                                                ("OGG", "VORBIS", 44100), ("OGG", "OPUS", 48000)])
def test_cut_mp3_and_ogg_files_are_truncated_not_shorter(speech, fmt, subtype, rate):
    """libsndfile decodes a cut MP3 or Ogg to a shorter signal without a word (a cut Vorbis file to none,
    which read as ``empty``): each is ``truncated``, wherever the cut falls; the whole file decodes, and
    an 8 kHz MP3 (MPEG 2.5, no ID3 tag) is recognised as MP3."""
    raw = _compressed(speech, rate, fmt, subtype)
    whole = decode_audio_bytes(raw, 10**8, 16000)
    assert len(whole) > 16000
    for frac in (0.1, 0.5, 0.9, 0.99):
        with pytest.raises(MediaError, match="truncated"):
            decode_audio_bytes(raw[: int(len(raw) * frac)], 10**8, 16000, max_samples=16000)


def test_mp3_tags_and_frames_without_a_xing_header(speech):
    """ID3v2 before the frames and an ID3v1 tag after them are not mistaken for a cut; with no Xing header
    (its frame dropped), a file cut inside a frame is still ``truncated`` (the frame walk)."""
    raw = _compressed(speech, 16000, "MP3")
    tagged = b"ID3\x04\x00\x00\x00\x00\x01\x00" + b"\x00" * 128 + raw + b"TAG" + b"\x00" * 125
    np.testing.assert_array_equal(decode_audio_bytes(tagged, 10**8, 16000), decode_audio_bytes(raw, 10**8, 16000))
    from tessera.encoders.audio_decode import _mp3_frame_length

    no_xing = raw[_mp3_frame_length(raw[:4]):]
    assert b"Xing" not in no_xing[:64] and b"Info" not in no_xing[:64]
    assert len(decode_audio_bytes(no_xing, 10**8, 16000)) > 16000
    cut = no_xing[: len(no_xing) // 2 + 7]
    with pytest.raises(MediaError, match="truncated: MP3 frame at byte"):
        decode_audio_bytes(cut, 10**8, 16000)
    # cut between frames: the walk ends cleanly, short of the Xing header's frame count
    bounds, pos = [], 0
    while pos < len(raw):
        pos += _mp3_frame_length(raw[pos:pos + 4])
        bounds.append(pos)
    with pytest.raises(MediaError, match="truncated: MP3 holds .* audio frames, its Xing header counts"):
        decode_audio_bytes(raw[: bounds[len(bounds) // 2]], 10**8, 16000)
    # a Xing byte count that a tag editor left stale (it counted a tag since removed) is not a cut
    k = raw.find(b"Xing") if b"Xing" in raw[:64] else raw.find(b"Info")
    stale = bytearray(raw)
    stale[k + 12:k + 16] = (len(raw) + 4096).to_bytes(4, "big")  # flags 15: frames, then bytes
    assert len(decode_audio_bytes(bytes(stale), 10**8, 16000)) > 16000
