"""Fixtures for the encoder tests: placeholder weights written once per session, real media files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from tessera.encoders.seeded import SEEDED_AUDIO_FOLDER, SEEDED_IMAGE_FOLDER, write_seeded_weights


@pytest.fixture(scope="session")
def seeded_root(tmp_path_factory) -> Path:
    """The placeholder image and audio weights (seed 0) in a local folder."""
    root = tmp_path_factory.mktemp("seeded-weights")
    write_seeded_weights(str(root), seed=0)
    return root


@pytest.fixture(scope="session")
def image_weights(seeded_root) -> Path:
    return seeded_root / SEEDED_IMAGE_FOLDER


@pytest.fixture(scope="session")
def audio_weights(seeded_root) -> Path:
    return seeded_root / SEEDED_AUDIO_FOLDER


@pytest.fixture(scope="session")
def grocery_jpegs(shared_data) -> list[Path]:
    """Six real grocery photos from different classes."""
    photos = sorted((shared_data / "grocery" / "dataset" / "val").rglob("*.jpg"))
    assert len(photos) > 100, "grocery photos not found"
    return photos[:: len(photos) // 6][:6]


@pytest.fixture(scope="session")
def fsdd_wavs(shared_data) -> list[Path]:
    """Six real spoken-digit recordings (8 kHz mono 16-bit), different digits and speakers."""
    names = ["0_george_0.wav", "1_jackson_3.wav", "3_theo_10.wav", "5_nicolas_7.wav", "7_yweweler_2.wav",
             "9_lucas_20.wav"]
    paths = [shared_data / "fsdd" / "recordings" / n for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    assert not missing, f"FSDD recordings not found: {missing}"
    return paths


def raw_png(width: int, height: int, raw: bytes, depth: int = 8) -> bytes:
    """An RGB PNG assembled by hand from its filtered scanlines ``raw`` (each a filter byte, then the
    samples), with valid chunk CRCs: for files Pillow cannot write (16-bit RGB) or will not write
    (an IDAT holding too little data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, depth, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
