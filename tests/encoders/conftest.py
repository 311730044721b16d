"""Fixtures for the encoder tests: placeholder weights written once per session, real media files."""

from __future__ import annotations

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
