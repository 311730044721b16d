"""Synthetic media for the sample corpus: JPEG images and WAV clips that carry latent attributes.

Images: a background of the item's colour (with per-item jitter and noise) and one shape drawn in a
light or dark tone at a random place and size. Audio: beeps at the item's pitch, repeated at its
tempo, with its timbre (waveform), plus noise. Neither says anything about the category.

Also the deliberately broken objects the corpus mixes in (corrupt, truncated, oversized, wrong format).
"""

from __future__ import annotations

import functools
import io
import wave

import numpy as np
from PIL import Image, ImageDraw

from tessera.corpus.attributes import COLOUR_NAMES, COLOURS, PITCHES_HZ, SHAPES, TEMPOS_BPS, TIMBRES


def render_image(rng: np.random.Generator, colour: int, shape: int, size: int = 96, quality: int = 90) -> bytes:
    """JPEG bytes of one synthetic product photo of the given colour and shape."""
    base = np.array(COLOURS[COLOUR_NAMES[colour]], dtype=np.float32)
    base = np.clip(base + rng.normal(0, 12, 3), 0, 255)
    pixels = np.clip(base + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)  # (H, W, 3)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    tone = int(rng.choice([25, 235])) + int(rng.integers(-15, 16))
    fill = (tone, tone, tone)
    r = int(size * rng.uniform(0.18, 0.32))
    cx, cy = (int(v) for v in rng.integers(r + 2, size - r - 2, 2))
    kind = SHAPES[shape]
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # cross
        w = max(2, r // 3)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def synth_waveform(rng: np.random.Generator, pitch: int, tempo: int, timbre: int,
                   sample_rate: int = 16000, seconds: float = 1.0) -> np.ndarray:
    """Float waveform in [-1, 1]: beeps of the pitch at the tempo with the timbre, plus noise."""
    n = int(sample_rate * seconds)
    t = np.arange(n, dtype=np.float32) / sample_rate
    freq = PITCHES_HZ[pitch] * float(np.exp(rng.normal(0, 0.02)))
    phase = (freq * t + rng.uniform(0, 1)) % 1.0
    kind = TIMBRES[timbre]
    if kind == "sine":
        tone = np.sin(2 * np.pi * phase)
    elif kind == "square":
        tone = np.where(phase < 0.5, 1.0, -1.0)
    else:  # sawtooth
        tone = 2.0 * phase - 1.0
    beeps = TEMPOS_BPS[tempo]
    gate = ((t * beeps + rng.uniform(0, 1)) % 1.0) < 0.5  # on half of each beat
    wav = 0.5 * tone * gate + rng.normal(0, 0.02, n)
    return np.clip(wav, -1, 1).astype(np.float32)


def wav_bytes(waveform: np.ndarray, sample_rate: int) -> bytes:
    """16-bit mono PCM WAV bytes."""
    pcm = (np.clip(waveform, -1, 1) * 32767).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return out.getvalue()


def render_audio(rng: np.random.Generator, pitch: int, tempo: int, timbre: int,
                 sample_rate: int = 16000, seconds: float = 1.0) -> bytes:
    return wav_bytes(synth_waveform(rng, pitch, tempo, timbre, sample_rate, seconds), sample_rate)


# --- broken objects ----------------------------------------------------------------------------

def corrupt_jpeg(rng: np.random.Generator, good: bytes) -> bytes:
    """A JPEG whose header survives but whose entropy-coded data is garbage."""
    head = good[:64]
    return head + rng.integers(0, 256, max(256, len(good) - 64), dtype=np.uint8).tobytes()


def truncate_wav(good: bytes) -> bytes:
    """A WAV cut short: the header promises more samples than follow."""
    return good[: 44 + (len(good) - 44) // 5]


@functools.lru_cache(maxsize=2)
def oversized_jpeg(side: int = 9000) -> bytes:
    """A flat JPEG of ``side``×``side`` pixels: small on the wire, a decompression bomb to decode."""
    out = io.BytesIO()
    Image.new("RGB", (side, side), (128, 128, 128)).save(out, format="JPEG", quality=50)
    return out.getvalue()
