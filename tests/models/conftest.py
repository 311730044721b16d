"""Fixtures for the model tests: one torch thread (the test machine's cores are shared), fixed seeds."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_seeded():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
