"""Image encoder on real grocery photos, with the placeholder seeded ResNet-18 and a tiny HF ViT."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tessera.encoders import ImageEncoder, ImageEncoderConfig, ImagePreprocessor, MediaError
from tessera.encoders.base import cpu_supports_bf16


@pytest.fixture(scope="module")
def image_fp32(image_weights) -> ImageEncoder:
    return ImageEncoder(ImageEncoderConfig(weights=str(image_weights), device="cpu", bf16_autocast=False,
                                           batch_size=4))


@pytest.fixture(scope="module")
def photos(grocery_jpegs) -> list[bytes]:
    return [p.read_bytes() for p in grocery_jpegs]


def _reencode(jpeg: bytes, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(out, format=fmt, **kwargs)
    return out.getvalue()


def test_real_photos_preprocess_to_model_input(image_fp32, photos):
    pixels = image_fp32.preprocessor(photos[0])
    assert pixels.shape == (3, 128, 128) and pixels.dtype == np.uint8  # size from preprocessor_config.json
    assert pixels.std() > 5  # a photo, not a blank


def test_real_photos_encode_to_distinct_unit_vectors(image_fp32, photos):
    vecs = image_fp32.embed(photos + photos[:1])
    assert vecs.shape == (len(photos) + 1, 512) and vecs.dtype == np.float32 and image_fp32.dim == 512
    assert np.isfinite(vecs).all()
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vecs[0], vecs[-1], atol=1e-6)  # same photo, same vector
    assert np.abs(vecs[0] - vecs[1]).max() > 1e-3  # different photos, different vectors


def test_vector_does_not_depend_on_batch_mates(image_fp32, photos):
    inputs = image_fp32.preprocessor.map(photos)
    batched = image_fp32.encode(inputs)  # micro-batches of 4
    alone = np.concatenate([image_fp32.encode([x]) for x in inputs])
    np.testing.assert_allclose(batched, alone, atol=1e-4)


def test_backbone_runs_channels_last_whatever_layout_the_pixels_arrive_in(image_fp32, image_weights, photos):
    # the preprocessor's pixels come out of torchvision's resize in channels-last strides; pixels that
    # crossed a process boundary (.npy bytes in the embedding job) arrive NCHW-contiguous
    decoded = image_fp32.preprocessor.map(photos)
    contiguous = [np.ascontiguousarray(x) for x in decoded]
    assert not decoded[0].flags.c_contiguous and contiguous[0].flags.c_contiguous
    seen = []
    hook = image_fp32.model.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        from_decoded, from_contiguous = image_fp32.encode(decoded), image_fp32.encode(contiguous)
    finally:
        hook.remove()
    assert seen and all(seen)  # every micro-batch, either layout
    assert image_fp32.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(from_decoded, from_contiguous, atol=1e-6)
    nchw = ImageEncoder(ImageEncoderConfig(weights=str(image_weights), device="cpu", bf16_autocast=False,
                                           batch_size=4, channels_last=False))
    assert not nchw.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(nchw.encode(contiguous), from_contiguous, atol=1e-4)  # same vectors


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")
def test_bf16_autocast_is_close_to_fp32(image_fp32, image_weights, photos):
    bf16 = ImageEncoder(ImageEncoderConfig(weights=str(image_weights), device="cpu", bf16_autocast=True))
    cos = np.sum(bf16.embed(photos) * image_fp32.embed(photos), axis=1)
    assert cos.min() > 0.99


@pytest.mark.parametrize("fmt, kwargs", [("PNG", {}), ("WEBP", {"quality": 90}), ("GIF", {})])
def test_other_formats_decode(image_fp32, photos, fmt, kwargs):
    pixels = image_fp32.preprocessor(_reencode(photos[0], fmt, **kwargs))
    assert pixels.shape == (3, 128, 128)
    if fmt == "PNG":  # lossless: same pixels as the JPEG decode
        np.testing.assert_array_equal(pixels, image_fp32.preprocessor(photos[0]))


def test_max_pooling_and_image_size_override(image_weights, photos):
    enc = ImageEncoder(ImageEncoderConfig(weights=str(image_weights), device="cpu", pooling="max", image_size=96))
    assert enc.preprocessor(photos[0]).shape == (3, 96, 96)
    vecs = enc.embed(photos[:2])
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def _corrupt(jpeg: bytes) -> bytes:
    rng = np.random.default_rng(0)
    return jpeg[:64] + rng.integers(0, 256, len(jpeg) - 64, dtype=np.uint8).tobytes()


def _bad_inputs(photos: list[bytes], wav: bytes) -> dict[str, tuple[bytes | None, str]]:
    png = _reencode(photos[1], "PNG")
    bmp = _reencode(photos[1], "BMP")
    return {
        "corrupt_jpeg": (_corrupt(photos[0]), "corrupt"),
        "random_bytes": (np.random.default_rng(1).bytes(5000), "corrupt"),
        "truncated_jpeg": (photos[0][: len(photos[0]) // 2], "truncated"),
        "jpeg_cut_in_header": (photos[0][:100], "truncated"),
        "truncated_png": (png[: len(png) - 5000], "truncated"),
        "wav_at_image": (wav, "wrong_format"),
        "text_at_image": ("Fresh basil, 30 g".encode(), "wrong_format"),
        "bmp_unsupported": (bmp, "wrong_format"),
        "empty": (b"", "empty"),
        "none": (None, "missing"),
    }


@pytest.mark.parametrize("case", ["corrupt_jpeg", "random_bytes", "truncated_jpeg", "jpeg_cut_in_header",
                                  "truncated_png", "wav_at_image", "text_at_image", "bmp_unsupported", "empty",
                                  "none"])
def test_bad_images_raise_media_error_of_kind(image_weights, photos, fsdd_wavs, case):
    prep = ImagePreprocessor(ImageEncoderConfig(weights=str(image_weights)))
    raw, kind = _bad_inputs(photos, fsdd_wavs[0].read_bytes())[case]
    with pytest.raises(MediaError) as err:
        prep(raw)
    assert err.value.kind == kind, str(err.value)


def test_oversized_bytes_and_pixels(image_weights, photos):
    by_bytes = ImagePreprocessor(ImageEncoderConfig(weights=str(image_weights), max_bytes=1000))
    with pytest.raises(MediaError, match="oversized: .* bytes"):
        by_bytes(photos[0])
    by_pixels = ImagePreprocessor(ImageEncoderConfig(weights=str(image_weights), max_pixels=1_000_000))
    bomb = io.BytesIO()
    Image.new("RGB", (3000, 2000), (128, 128, 128)).save(bomb, format="JPEG", quality=50)  # 6 MP, ~60 KB
    with pytest.raises(MediaError, match="oversized: 3000x2000 pixels"):
        by_pixels(bomb.getvalue())


def test_torchvision_pth_checkpoint_loads_the_same(image_fp32, image_weights, photos, tmp_path):
    """A folder with a plain torchvision state_dict (*.pth), as torchvision's own downloads are."""
    folder = tmp_path / "resnet18-pth"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(image_weights / name, folder / name)
    from safetensors.torch import load_file

    torch.save(load_file(image_weights / "model.safetensors"), folder / "resnet18-seeded.pth")
    enc = ImageEncoder(ImageEncoderConfig(weights=str(folder), device="cpu", bf16_autocast=False))
    np.testing.assert_allclose(enc.embed(photos[:2]), image_fp32.embed(photos[:2]), atol=1e-6)


def test_hugging_face_vision_model_folder(tmp_path, photos):
    """A save_pretrained folder (a tiny seeded ViT here) loads through AutoModel: a config change."""
    from transformers import ViTConfig, ViTModel

    folder = tmp_path / "tiny-vit"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=64, patch_size=16), add_pooling_layer=False)
    vit.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"height": 64, "width": 64}, "do_center_crop": False, "resample": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    enc = ImageEncoder(ImageEncoderConfig(weights=str(folder), device="cpu"))
    vecs = enc.embed(photos[:3])
    assert enc.dim == 32 and vecs.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
