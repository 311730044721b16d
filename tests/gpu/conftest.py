"""Fixtures for the tests that run the CUDA paths: skipped where torch sees no CUDA device.

CI has no GPU, so these run only on a machine with one (``pytest -m gpu``). The encoders load the
same weights as elsewhere: the packaged all-MiniLM-L6-v2 (or the folder in
``TESSERA_TEST_TEXT_WEIGHTS``, for a GPU machine without the package) and the seeded placeholder
image and audio weights of ``tests/encoders/conftest.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.encoders.conftest import audio_weights, fsdd_wavs, grocery_jpegs, image_weights, seeded_root  # noqa: F401

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")


@pytest.fixture(scope="session")
def text_weights() -> str:
    from tessera.encoders.text import packaged_minilm_path

    return os.environ.get("TESSERA_TEST_TEXT_WEIGHTS") or packaged_minilm_path()
