"""Every encoder on a CUDA device (bf16 autocast) gives the vectors of the CPU in fp32, in input order.

What the embedding job's GPU pools and the serving QueryEncoder run when ``num_gpus > 0``: the model
and every micro-batch on the device, the vectors back on the host as float32 numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tessera.encoders import (
    AudioEncoder,
    AudioEncoderConfig,
    ImageEncoder,
    ImageEncoderConfig,
    TextEncoder,
    TextEncoderConfig,
)
from tests.gpu.conftest import needs_cuda

pytestmark = [pytest.mark.gpu, needs_cuda]


def _texts(shared_data, n: int = 81) -> list[str]:
    files = sorted((shared_data / "grocery" / "dataset" / "iconic-images-and-descriptions").rglob("*_Description.txt"))
    assert len(files) >= n, "grocery descriptions not found"
    return [f.read_text(encoding="utf-8", errors="replace") for f in files[:n]]


def _photos(shared_data, n: int = 96) -> list[bytes]:
    photos = sorted((shared_data / "grocery" / "dataset" / "val").rglob("*.jpg"))
    assert len(photos) >= n, "grocery photos not found"
    return [p.read_bytes() for p in photos[:: len(photos) // n][:n]]


def _wavs(shared_data, n: int = 64) -> list[bytes]:
    wavs = sorted((shared_data / "fsdd" / "recordings").glob("*.wav"))
    assert len(wavs) >= n, "FSDD recordings not found"
    return [p.read_bytes() for p in wavs[:: len(wavs) // n][:n]]


def _compare(cpu, gpu, raws, min_cosine: float) -> None:
    assert gpu.device.startswith("cuda") and all(p.is_cuda for p in gpu.model.parameters())
    assert gpu.autocast_dtype in (torch.bfloat16, torch.float16)
    assert cpu.device == "cpu" and cpu.autocast_dtype is None
    inputs = cpu.preprocessor.map(raws)
    bad = [x for x in inputs if isinstance(x, Exception)]
    assert not bad, bad[:3]
    ref = cpu.encode(inputs)
    out = gpu.encode(inputs)  # several micro-batches, sorted by length for text
    assert out.shape == ref.shape and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)
    cosine = (out * ref).sum(axis=1)
    assert cosine.min() >= min_cosine, (float(cosine.min()), float(cosine.mean()))
    # input order kept: each device vector is nearest to its own CPU vector among distinct inputs
    distinct = np.unique(ref.round(4), axis=0, return_index=True)[1]
    nearest = (out[distinct] @ ref[distinct].T).argmax(axis=1)
    assert (nearest == np.arange(len(distinct))).all()
    # the same item alone gives the same vector as in a batch (no leakage across the padded batch)
    alone = gpu.encode([inputs[-1]])
    assert float(alone[0] @ out[-1]) > 0.999


def test_text_encoder_on_cuda_matches_cpu_fp32(text_weights, shared_data):
    cfg = dict(weights=str(text_weights), batch_size=16)
    cpu = TextEncoder(TextEncoderConfig(**cfg, device="cpu", bf16_autocast=False))
    gpu = TextEncoder(TextEncoderConfig(**cfg, device="cuda"))
    _compare(cpu, gpu, _texts(shared_data), min_cosine=0.995)


def test_image_encoder_on_cuda_matches_cpu_fp32(image_weights, shared_data):
    cfg = dict(weights=str(image_weights), batch_size=32)
    cpu = ImageEncoder(ImageEncoderConfig(**cfg, device="cpu", bf16_autocast=False))
    gpu = ImageEncoder(ImageEncoderConfig(**cfg, device="cuda"))
    _compare(cpu, gpu, _photos(shared_data), min_cosine=0.99)


def test_audio_encoder_on_cuda_matches_cpu_fp32(audio_weights, shared_data):
    cfg = dict(weights=str(audio_weights), batch_size=16)
    cpu = AudioEncoder(AudioEncoderConfig(**cfg, device="cpu", bf16_autocast=False))
    gpu = AudioEncoder(AudioEncoderConfig(**cfg, device="cuda"))
    _compare(cpu, gpu, _wavs(shared_data), min_cosine=0.99)


def test_auto_device_takes_the_gpu(text_weights):
    enc = TextEncoder(TextEncoderConfig(weights=str(text_weights)))  # device="auto"
    assert enc.device.startswith("cuda")
    vecs = enc.embed(["a crisp red apple", "oat milk, 1 litre"])
    assert vecs.shape == (2, enc.dim) and np.isfinite(vecs).all()
