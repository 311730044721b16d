"""Audio bytes -> ``float32`` mono waveform at a target rate, with structural checks first.

WAV files are walked chunk by chunk before decoding: a ``data`` chunk that declares more bytes than
follow is ``truncated`` (libsndfile would silently return the shorter signal). Decoding uses
``soundfile`` (libsndfile: WAV in any PCM / float width, FLAC, OGG/Vorbis, MP3), which needs no
torchcodec; resampling uses ``torchaudio.functional.resample`` (windowed-sinc interpolation).

Example::

    wave = decode_audio_bytes(Path("0_george_0.wav").read_bytes(), max_bytes=20_000_000,
                              sample_rate=16000)       # float32 (T,), mono, 16 kHz
"""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF

from tessera.encoders.errors import MediaError, check_size
from tessera.encoders.sniff import sniff

DECODABLE = ("wav", "flac", "ogg", "mp3")
_STREAMING_SIZE = 0xFFFFFFFF  # data size written by streaming encoders: "until the end of the file"


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


def decode_audio_bytes(data: bytes, max_bytes: int, sample_rate: int) -> np.ndarray:
    """Decode, downmix to mono and resample to ``sample_rate``.

    Returns:
        ``float32`` ``(T,)``.

    Raises:
        MediaError: ``empty`` (no bytes or no samples), ``oversized``, ``wrong_format``,
            ``truncated``, ``corrupt`` (undecodable, or non-finite samples).
    """
    check_size(data, max_bytes)
    found = sniff(data)
    if found is None:
        raise MediaError("corrupt", "not a recognisable audio file (unknown magic bytes)")
    family, fmt = found
    if family != "audio":
        raise MediaError("wrong_format", f"expected audio, got {fmt} bytes")
    if fmt == "wav":
        check_wav(data)
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (T, channels)
    except soundfile.SoundFileError as err:
        raise MediaError("corrupt", f"{fmt} decode failed: {err}") from None
    if samples.shape[0] == 0:
        raise MediaError("empty", f"{fmt} file has no samples")
    if not np.isfinite(samples).all():
        raise MediaError("corrupt", f"{fmt} file holds non-finite samples")
    mono = torch.from_numpy(samples.mean(axis=1))  # (T,)
    if rate != sample_rate:
        mono = AF.resample(mono, orig_freq=int(rate), new_freq=sample_rate)  # (T * sample_rate / rate,)
    return mono.numpy().astype(np.float32, copy=False)
