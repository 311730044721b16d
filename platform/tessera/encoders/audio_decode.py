"""Audio bytes -> ``float32`` mono waveform at a target rate, with structural checks first.

WAV, MP3 and Ogg files are walked before decoding, since libsndfile silently returns the shorter
signal of a cut file (or, for Ogg, none at all): a WAV ``data`` chunk that declares more bytes than
follow, an MP3 frame cut short or fewer frames than its Xing/Info header counts, and an Ogg page cut
short or a stream without its end-of-stream page are ``truncated``. Decoding uses
``soundfile`` (libsndfile: WAV in any PCM / float width, FLAC, OGG/Vorbis, MP3), which needs no
torchcodec; resampling uses ``torchaudio.functional.resample`` (windowed-sinc interpolation).

Work and memory are bounded by what the caller keeps, not by what the header claims: the sample rate
is read from the header first and must lie in ``MIN_SAMPLE_RATE..MAX_SAMPLE_RATE``; with
``max_samples`` only the source frames those output samples depend on are decoded (a 110 KB FLAC of
silence can hold an hour), downmixed block by block; and a rate pair whose exact resampling filter
bank would be huge (44101 Hz -> 16 kHz: 700 M taps) is resampled at the nearest ratio of small terms.

Example::

    wave = decode_audio_bytes(Path("0_george_0.wav").read_bytes(), max_bytes=20_000_000,
                              sample_rate=16000)       # float32 (T,), mono, 16 kHz
"""

from __future__ import annotations

import io
import math
import struct
from fractions import Fraction

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF

from tessera.encoders.errors import MediaError, check_size
from tessera.encoders.sniff import is_mp3_frame, sniff

DECODABLE = ("wav", "flac", "ogg", "mp3")
_STREAMING_SIZE = 0xFFFFFFFF  # data size written by streaming encoders: "until the end of the file"
# Sample rates outside this range are refused as ``corrupt``: 1 kHz is below any speech codec's rate,
# 768 kHz is the highest rate DACs and DSD-to-PCM converters produce. A header saying 1 Hz would
# otherwise turn 400 KB of WAV into 12.8 GB of 16 kHz samples.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 768_000
# torchaudio's windowed-sinc settings (its defaults, passed explicitly: the frame count needed for a
# clip below is derived from them).
_LOWPASS_WIDTH, _ROLLOFF = 6, 0.99
# Taps in torchaudio's filter bank, new x (2 * width + orig) for the reduced rate pair: every standard
# rate pair is far below it (44.1 kHz -> 16 kHz: 76 k); a larger one is resampled at a close ratio.
_MAX_RESAMPLE_TAPS = 1 << 20
# Decoded samples (frames x channels) held at once while downmixing.
_BLOCK_SAMPLES = 1 << 20


def check_wav(data: bytes) -> None:
    """Walk a RIFF/WAVE file's chunks; raise ``truncated`` or ``corrupt`` when they do not add up."""
    n = len(data)
    if n < 12:
        raise MediaError("truncated", f"WAV header cut short at {n} bytes")
    riff_size = struct.unpack("<I", data[4:8])[0]
    pos, have_fmt = 12, False
    while pos + 8 <= n:
        cid, size = struct.unpack("<4sI", data[pos:pos + 8])
        if not all(32 <= b < 127 for b in cid):
            raise MediaError("corrupt", f"WAV chunk id {cid!r} at byte {pos} is not a chunk name")
        body = pos + 8
        if cid == b"fmt ":
            if size < 16:
                raise MediaError("corrupt", f"WAV fmt chunk of {size} bytes (needs 16)")
            if body + size > n:
                raise MediaError("truncated", "WAV fmt chunk runs past the end of the file")
            have_fmt = True
        elif cid == b"data":
            if not have_fmt:
                raise MediaError("corrupt", "WAV data chunk before its fmt chunk")
            if size != _STREAMING_SIZE and body + size > n:
                raise MediaError("truncated", f"WAV data chunk declares {size} bytes, {n - body} present")
            return
        pos = body + size + (size & 1)  # chunks are word-aligned
    if riff_size + 8 > n or pos > n:
        raise MediaError("truncated", f"WAV ends at {n} bytes before its data chunk")
    raise MediaError("corrupt", "WAV has no data chunk")


# Layer III bitrates (kbit/s) by bitrate index: MPEG-1, and MPEG-2 / 2.5; sample rates by version bits.
_MP3_KBPS = {1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
             2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)}
_MP3_RATES = {0b11: (44100, 48000, 32000), 0b10: (22050, 24000, 16000), 0b00: (11025, 12000, 8000)}


def _mp3_frame_length(head: bytes) -> int | None:
    """Bytes of the Layer III frame whose 4-byte header is ``head``; None if it is not one, or is
    free-format (its length is not in the header)."""
    if not is_mp3_frame(head) or head[2] >> 4 == 0:
        return None
    version = (head[1] >> 3) & 0b11
    kbps = _MP3_KBPS[1 if version == 0b11 else 2][head[2] >> 4]
    rate = _MP3_RATES[version][(head[2] >> 2) & 0b11]
    return (144 if version == 0b11 else 72) * kbps * 1000 // rate + ((head[2] >> 1) & 1)


def check_mp3(data: bytes) -> None:
    """Walk an MP3's frames (after its ID3v2 tag); raise ``truncated`` when the tag or a frame runs past
    the end, or the frames end (at the file's end or a trailing tag) short of the count its Xing/Info
    header states. Other bytes that are not a frame (junk) stop the walk, saying nothing: the decoder
    judges those. Frames, not bytes, are compared: a tag editor changes a file's bytes, not its frames."""
    n, pos = len(data), 0
    if data[:3] == b"ID3" and n >= 10:
        size = sum((data[6 + i] & 0x7F) << (7 * (3 - i)) for i in range(4))  # syncsafe: 7 bits a byte
        pos = 10 + size + (10 if data[5] & 0x10 else 0)  # header, tag, footer
        if pos > n:
            raise MediaError("truncated", f"MP3's ID3 tag declares {pos} bytes, {n} present")
    first, frames, declared = pos, 0, None
    while pos + 4 <= n:
        length = _mp3_frame_length(data[pos:pos + 4])
        if length is None:
            break
        if pos + length > n:
            raise MediaError("truncated", f"MP3 frame at byte {pos} needs {length} bytes, {n - pos} present")
        if pos == first:
            declared = _xing_frames(data, pos)
            frames -= declared is not None  # the Xing/Info frame holds no audio
        frames += 1
        pos += length
    ended = pos + 4 > n or data[pos:pos + 3] in (b"TAG", b"ID3") or data[pos:pos + 8] == b"APETAGEX" \
        or data[pos:pos + 11] == b"LYRICSBEGIN"
    # LAME counts the audio frames; an encoder that counted its Xing frame too is allowed one more
    if declared is not None and ended and frames < declared - 1:
        raise MediaError("truncated", f"MP3 holds {frames} audio frames, its Xing header counts {declared}")


def _xing_frames(data: bytes, pos: int) -> int | None:
    """The frame count in the Xing/Info header of the frame at ``pos``, or None when it has none."""
    head = data[pos:pos + 4]
    mono = head[3] >> 6 == 0b11
    side = (17 if mono else 32) if (head[1] >> 3) & 0b11 == 0b11 else (9 if mono else 17)
    tag = pos + 4 + side
    if data[tag:tag + 4] not in (b"Xing", b"Info") or len(data) < tag + 12:
        return None
    flags = struct.unpack(">I", data[tag + 4:tag + 8])[0]
    return struct.unpack(">I", data[tag + 8:tag + 12])[0] if flags & 0x1 else None


def check_ogg(data: bytes) -> None:
    """Walk an Ogg file's pages; raise ``truncated`` when a page runs past the end or the pages end
    without an end-of-stream page. Bytes that are not a page stop the walk, saying nothing."""
    n, pos, ended = len(data), 0, False
    while pos < n:
        if data[pos:pos + 4] != b"OggS":
            return  # junk (or a trailing tag): the decoder judges it
        if pos + 27 > n:
            raise MediaError("truncated", f"Ogg page header at byte {pos} cut short")
        segments = data[pos + 26]
        if pos + 27 + segments > n:
            raise MediaError("truncated", f"Ogg page at byte {pos}: segment table cut short")
        end = pos + 27 + segments + sum(data[pos + 27:pos + 27 + segments])
        if end > n:
            raise MediaError("truncated", f"Ogg page at byte {pos} needs {end - pos} bytes, {n - pos} present")
        ended = ended or bool(data[pos + 5] & 0x04)
        pos = end
    if not ended:
        raise MediaError("truncated", f"Ogg stream ends at byte {n} without its end-of-stream page")


def decode_audio_bytes(data: bytes, max_bytes: int, sample_rate: int, max_samples: int | None = None) -> np.ndarray:
    """Decode, downmix to mono and resample to ``sample_rate``.

    Args:
        data: the file's bytes.
        max_bytes: larger inputs are ``oversized``.
        sample_rate: the output rate.
        max_samples: return only the first this many output samples, decoding only the source frames
            they depend on (the same samples as decoding everything and cutting); None: all of them.

    Returns:
        ``float32`` ``(T,)``, ``T <= max_samples``.

    Raises:
        MediaError: ``empty`` (no bytes or no samples), ``oversized``, ``wrong_format``,
            ``truncated``, ``corrupt`` (undecodable, a sample rate outside
            ``MIN_SAMPLE_RATE..MAX_SAMPLE_RATE``, or non-finite samples).
    """
    check_size(data, max_bytes)
    found = sniff(data)
    if found is None:
        raise MediaError("corrupt", "not a recognisable audio file (unknown magic bytes)")
    family, fmt = found
    if family != "audio":
        raise MediaError("wrong_format", f"expected audio, got {fmt} bytes")
    {"wav": check_wav, "mp3": check_mp3, "ogg": check_ogg}.get(fmt, lambda _: None)(data)
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:  # reads the header only
            rate = f.samplerate
            if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
                raise MediaError("corrupt", f"{fmt} header states a sample rate of {rate} Hz, outside "
                                            f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
            orig, new = resample_ratio(rate, sample_rate)
            frames = None if max_samples is None else source_frames(max_samples, orig, new)
            mono = _read_mono(f, frames)  # (T,)
    except soundfile.SoundFileError as err:
        raise MediaError("corrupt", f"{fmt} decode failed: {err}") from None
    if mono.shape[0] == 0:
        raise MediaError("empty", f"{fmt} file has no samples")
    if not np.isfinite(mono).all():
        raise MediaError("corrupt", f"{fmt} file holds non-finite samples")
    wave = torch.from_numpy(mono)  # (T,)
    if orig != new:
        wave = AF.resample(wave, orig_freq=orig, new_freq=new, lowpass_filter_width=_LOWPASS_WIDTH,
                           rolloff=_ROLLOFF)  # (T * new / orig,)
    return wave[:max_samples].numpy().astype(np.float32, copy=False)


def resample_ratio(rate: int, target: int) -> tuple[int, int]:
    """``(orig, new)`` to resample ``rate`` to ``target`` with: the exact ratio, reduced, unless its
    filter bank would exceed ``_MAX_RESAMPLE_TAPS``; then a close ratio of smaller terms (44101 Hz ->
    16 kHz: 435/1199 instead of 16000/44101, 4e-6 off; timing and pitch move by as little).

    Example::

        resample_ratio(44100, 16000)    # -> (441, 160)
    """
    gcd = math.gcd(rate, target)
    orig, new = rate // gcd, target // gcd
    limit = orig
    while _resample_taps(orig, new) > _MAX_RESAMPLE_TAPS and limit > 1:
        limit //= 2
        close = Fraction(target, rate).limit_denominator(limit)
        orig, new = close.denominator, close.numerator
    return orig, new


def _resample_taps(orig: int, new: int) -> int:
    """Size of torchaudio's sinc filter bank for a reduced rate pair: ``new`` filters of ``2 * width + orig``."""
    return new * (2 * _sinc_width(orig, new) + orig)


def _sinc_width(orig: int, new: int) -> int:
    """torchaudio's one-sided filter width, in source samples, for a reduced rate pair."""
    return math.ceil(_LOWPASS_WIDTH * orig / (min(orig, new) * _ROLLOFF))


def source_frames(samples: int, orig: int, new: int) -> int:
    """Source frames the first ``samples`` outputs of resampling ``orig`` -> ``new`` (reduced) depend on.

    torchaudio computes output block ``b`` (outputs ``b * new ..``) from source samples up to
    ``(b + 1) * orig + width``; one extra block guards against rounding.
    """
    if orig == new:
        return samples
    blocks = -(-samples // new)  # ceil
    return (blocks + 1) * orig + _sinc_width(orig, new)


def _read_mono(f: soundfile.SoundFile, frames: int | None) -> np.ndarray:
    """Up to ``frames`` frames (None: all), averaged over channels one block at a time: ``float32 (T,)``.

    Plain ``read`` calls, not ``SoundFile.blocks``: ``blocks`` reuses one buffer and yields it whole even
    after a short read, so a file whose header promises more frames than it holds (a cut MP3 keeps
    its Xing length) came back with stale memory, another item's samples included, after its real
    ones. A short or empty read ends the file here."""
    blocksize = max(1, _BLOCK_SAMPLES // f.channels)
    left = frames
    parts = []
    while left is None or left > 0:
        want = blocksize if left is None else min(blocksize, left)
        block = f.read(want, dtype="float32", always_2d=True)  # (n, channels), n <= want: a fresh array
        if len(block):
            parts.append(block.mean(axis=1))
        if len(block) < want:
            break
        if left is not None:
            left -= len(block)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
