"""Image encoder on real grocery photos, with the placeholder seeded ResNet-18 and a tiny HF ViT."""

from __future__ import annotations

import io
import json
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_image
from torchvision.transforms.v2 import functional as TF

from tessera.encoders import ImageEncoder, ImageEncoderConfig, ImagePreprocessor, MediaError
from tessera.encoders.base import cpu_supports_bf16
from tessera.encoders.image import trim_for_crop
from tessera.encoders.image_decode import decode_image_bytes
from tests.encoders.conftest import raw_png


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


def test_a_png_with_a_second_header_cannot_pass_the_pixel_limit(image_weights):
    """A 7000x7000 PNG whose IHDR is followed by a second IHDR saying 1x1: the header walk took the last
    one, and 49 MP went past max_pixels (1.2 GB to decode). Now the first chunk is the only header, and
    Pillow's own size is checked again before any pixel is decoded."""
    import struct
    import zlib

    from tessera.encoders.image_decode import _decode_pillow

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    def header(w, h):
        return chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))

    rows = zlib.compress(b"\x00" * (1 + 3 * 7000) * 16)  # a few rows: the rest is missing, as in a bomb
    crafted = b"\x89PNG\r\n\x1a\n" + header(7000, 7000) + chunk(b"IDAT", rows) + header(1, 1) + chunk(b"IEND", b"")
    prep = ImagePreprocessor(ImageEncoderConfig(weights=str(image_weights), max_pixels=1_000_000))
    with pytest.raises(MediaError, match="corrupt: PNG's IHDR chunk is not its first"):
        prep(crafted)
    late = b"\x89PNG\r\n\x1a\n" + chunk(b"tEXt", b"k\x00v") + header(1, 1) + chunk(b"IEND", b"")
    with pytest.raises(MediaError, match="corrupt: PNG starts with a b'tEXt' chunk"):
        prep(late)
    with pytest.raises(MediaError, match="oversized: 7000x7000 pixels"):  # and behind the walk, Pillow's size
        _decode_pillow(b"\x89PNG\r\n\x1a\n" + header(7000, 7000) + chunk(b"IDAT", rows) + chunk(b"IEND", b""),
                       "png", 1_000_000)


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


@pytest.mark.parametrize("config", [
    {"image_processor_type": "DeiTImageProcessor", "size": 256, "crop_size": 224, "do_center_crop": True},  # square
    {"image_processor_type": "CLIPImageProcessor", "size": 224, "crop_size": 224},  # shorter side
    {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 224}, "crop_pct": 0.875},
    {"image_processor_type": "ViTImageProcessor", "size": {"height": 224, "width": 224}},  # class defaults
])
def test_a_checkpoint_s_processor_config_gives_its_own_processor_s_pixels(tmp_path, shared_data, config):
    """An integer size was always read as the shorter side (DeiT's is a square: a 640x480 photo lost a third of
    its width to the crop, not an eighth), keys left out took our defaults (bilinear, mean 0) not the class's,
    and ConvNeXt's crop_pct was ignored. Compared with the transformers processor itself on non-square photos."""
    import transformers

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    prep = ImagePreprocessor(ImageEncoderConfig(weights=str(tmp_path), device="cpu"))
    t = prep.transform
    reference = getattr(transformers, config["image_processor_type"]).from_dict(config)
    checked = set()
    for path in sorted((shared_data / "grocery" / "dataset").rglob("*.jpg")):  # 3:4 and 4:3 photos among them
        raw = path.read_bytes()
        image = Image.open(io.BytesIO(raw)).convert("RGB")
        if image.width == image.height or (image.width > image.height) in checked:
            continue
        ours = torch.from_numpy(prep(raw)).float() * t.rescale
        ours = (ours - torch.tensor(t.mean)[:, None, None]) / torch.tensor(t.std)[:, None, None]
        theirs = torch.as_tensor(np.asarray(reference(image, return_tensors="np")["pixel_values"][0]))
        assert ours.shape == theirs.shape == (3, 224, 224)
        # resampling kernels differ a little (and ours is uint8): the geometry must not
        assert (ours - theirs).abs().mean() < 0.03, (config, path.name, (ours - theirs).abs().mean())
        checked.add(image.width > image.height)
        if len(checked) == 2:
            break
    assert checked == {True, False}  # a landscape and a portrait photo


@pytest.mark.parametrize("config, message", [
    ({"size": 224, "crop_size": 224}, "an integer is the shorter side for some image processors and a square"),
    ({"image_processor_type": "PoolFormerImageProcessor", "size": {"shortest_edge": 224}}, "crop_pct 0.9"),
    ({"image_processor_type": "LevitImageProcessor"}, "LeViT's"),
    ({"size": {"height": 64, "width": 64}, "resample": 1}, r"resample 1 \(Lanczos\)"),
    ({"size": {"height": 64, "width": 64}, "do_resize": False}, "do_resize false"),
])
def test_a_processor_config_the_transform_cannot_follow_is_refused_naming_the_file(tmp_path, config, message):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"preprocessor_config.json: .*{message}"):
        _ = ImagePreprocessor(ImageEncoderConfig(weights=str(tmp_path), device="cpu")).transform


@pytest.mark.parametrize("kind", ["vision_with_projection", "dual_encoder"])
def test_a_clip_folder_gives_clip_s_own_image_embedding(tmp_path, photos, kind):
    """A CLIP vision tower (the README's suggested replacement) gives CLIP's image embedding: the
    projected, post-layernorm CLS (AutoModel loaded a *WithProjection folder without its projection and
    the encoder averaged raw tokens; a whole CLIPModel folder failed asking for input_ids)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=64, patch_size=16, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "vision_with_projection":
            model = CLIPVisionModelWithProjection(vision)
        else:
            text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  projection_dim=16)
            model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    folder = tmp_path / kind
    model.eval().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"height": 64, "width": 64}, "do_center_crop": False, "resample": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    enc = ImageEncoder(ImageEncoderConfig(weights=str(folder), device="cpu", bf16_autocast=False))
    ours = enc.embed(photos[:2])
    assert enc.dim == 16 and ours.shape == (2, 16)
    pixels = torch.stack([torch.from_numpy(enc.preprocessor(raw)) for raw in photos[:2]]).float() / 255
    with torch.no_grad():
        if kind == "vision_with_projection":
            expected = model(pixel_values=(pixels - 0.5) / 0.5).image_embeds
        else:
            expected = model.get_image_features(pixel_values=(pixels - 0.5) / 0.5).pooler_output
    expected = torch.nn.functional.normalize(expected, dim=1).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-5)


# --- work and memory bounded by the output, whatever the header declares ---


def _png(width: int, height: int, color=(200, 30, 10)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def _resize_then_crop(prep: ImagePreprocessor, raw: bytes) -> np.ndarray:
    """The pipeline without trimming: resize the whole image, then centre-crop."""
    t = prep.transform
    img = decode_image_bytes(raw, prep.config.max_bytes, prep.config.max_pixels)
    img = TF.resize(img, [t.resize], interpolation=t.interpolation, antialias=True)
    return TF.center_crop(img, list(t.crop)).numpy()


@pytest.mark.parametrize("width, height", [(4000, 1), (1, 4000), (900_000, 1)])
def test_extreme_aspect_ratios_cost_what_the_crop_does(image_weights, width, height):
    # resized shorter-side-first, 900000x1 (2.7 KB of PNG) was a 3x128x115200000 tensor (44 GB)
    prep = ImagePreprocessor(ImageEncoderConfig(weights=str(image_weights)))
    [pixels] = prep.map([_png(width, height)])
    assert isinstance(pixels, np.ndarray) and pixels.shape == (3, 128, 128)
    assert (pixels.reshape(3, -1).T == (200, 30, 10)).all()  # the banner's colour, edge to edge


def test_trim_keeps_the_middle_the_crop_takes():
    img = torch.arange(4000, dtype=torch.int32).view(1, 1, 4000).expand(3, 1, 4000)
    trimmed, size = trim_for_crop(img, (128, 512_000), (128, 128))
    assert size == (128, 512) and trimmed.shape == (3, 1, 4)  # 4 crops wide at most
    assert trimmed[0, 0].tolist() == [1998, 1999, 2000, 2001]
    middle, size = trim_for_crop(img[..., :400], (128, 12_800), (128, 128))
    assert size == (128, 512) and middle[0, 0].tolist() == list(range(192, 208))
    untouched, size = trim_for_crop(img[..., :4], (128, 512), (128, 128))
    assert size == (128, 512) and untouched.shape == (3, 1, 4)


@pytest.mark.parametrize("image_size", [None, 96])
def test_normal_photos_give_the_same_pixels_as_resize_then_crop(image_weights, photos, image_size):
    prep = ImagePreprocessor(ImageEncoderConfig(weights=str(image_weights), image_size=image_size))
    for raw in photos + [_reencode(photos[0], "PNG", optimize=False)]:
        np.testing.assert_array_equal(prep(raw), _resize_then_crop(prep, raw))
    wide = _reencode_resized(photos[1], (512, 128))  # 4:1, the widest kept as it is
    np.testing.assert_array_equal(prep(wide), _resize_then_crop(prep, wide))


def _reencode_resized(jpeg: bytes, size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("RGB").resize(size).save(out, format="PNG")
    return out.getvalue()


def test_panoramas_past_the_bound_match_resize_then_crop_up_to_a_subpixel_shift(image_weights, photos):
    prep = ImagePreprocessor(ImageEncoderConfig(weights=str(image_weights)))
    even = _reencode_resized(photos[2], (1536, 256))  # 6:1, 2 source pixels per output pixel
    np.testing.assert_array_equal(prep(even), _resize_then_crop(prep, even))
    for size in [(401, 2999), (3001, 400)]:  # scales that do not divide evenly
        raw = _reencode_resized(photos[2], size)
        diff = np.abs(prep(raw).astype(int) - _resize_then_crop(prep, raw))
        assert diff.mean() < 1.0, diff.mean()  # grey levels; a shift under half an output pixel


def _gif(img: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, format="GIF", **kwargs)
    return out.getvalue()


def test_animated_gif_decodes_its_first_frame_only(photos):
    frames = [Image.open(io.BytesIO(p)).convert("RGB").resize((64, 48)) for p in photos]
    animated = _gif(frames[0], save_all=True, append_images=frames[1:])
    first = decode_image_bytes(animated, 10**7, 10**7)
    assert first.shape == (3, 48, 64)
    np.testing.assert_array_equal(first.permute(1, 2, 0).numpy(),
                                  np.asarray(Image.open(io.BytesIO(animated)).convert("RGB")))
    # a later frame of LZW garbage: decoding every frame (what torchvision does) fails on it
    still = _gif(frames[0])
    garbage = b"\x2c" + struct.pack("<HHHHB", 0, 0, 64, 48, 0) + b"\x08" + b"\xff" * 256 * 3 + b"\x00"
    with_garbage = still[:-1] + garbage + b"\x3b"
    with pytest.raises(RuntimeError):
        decode_image(torch.frombuffer(bytearray(with_garbage), dtype=torch.uint8))
    np.testing.assert_array_equal(decode_image_bytes(with_garbage, 10**7, 10**7),
                                  decode_image_bytes(still, 10**7, 10**7))


def test_gif_pixel_limit_counts_the_first_frame_not_just_the_screen(image_weights):
    gif = bytearray(_gif(Image.new("P", (3000, 2000), 1)))
    gif[6:10] = struct.pack("<HH", 1, 1)  # logical screen 1x1, first image 3000x2000
    prep = ImagePreprocessor(ImageEncoderConfig(weights=str(image_weights), max_pixels=1_000_000))
    with pytest.raises(MediaError, match="oversized: 3000x2000 pixels"):
        prep(bytes(gif))


@pytest.mark.parametrize("cut", [12, 30, -40])  # in the header, the colour table, the image data
def test_gif_cut_inside_its_first_image_is_truncated(photos, cut):
    gif = _gif(Image.open(io.BytesIO(photos[0])).convert("RGB").resize((64, 48)))
    with pytest.raises(MediaError) as err:
        decode_image_bytes(gif[:cut], 10**7, 10**7)
    assert err.value.kind == "truncated", str(err.value)


def test_broken_png_row_data_fails_the_item_not_the_process(tmp_path):
    """torchvision 0.29 segfaults on libpng errors raised while reading rows (a 67-byte PNG with an
    empty IDAT killed a QueryEncoder replica, then the two it was retried on); run in a child so a
    regression shows as a crash here, not as a dead test session."""
    import subprocess
    import sys

    good = raw_png(8, 8, b"".join(b"\x00" + bytes(range(24)) for _ in range(8)))
    rng = np.random.default_rng(0)
    cases = [raw_png(1, 1, b""), raw_png(4, 4, b"\x00" * 5), good[:-12] + b"\x00\x00\x00\x00" + good[-12:]]
    for _ in range(40):
        flipped = bytearray(good)
        for pos in rng.integers(33, len(good) - 12, 3):
            flipped[pos] ^= int(rng.integers(1, 256))
        cases.append(bytes(flipped))
    for i, data in enumerate(cases):
        (tmp_path / f"{i}.png").write_bytes(data)
    script = (
        "import sys, pathlib\n"
        "from tessera.encoders.image_decode import decode_image_bytes\n"
        "from tessera.encoders import MediaError\n"
        "kinds = []\n"
        "for p in sorted(pathlib.Path(sys.argv[1]).glob('*.png'), key=lambda p: int(p.stem)):\n"
        "    try:\n"
        "        decode_image_bytes(p.read_bytes(), 10**7, 10**8); kinds.append('ok')\n"
        "    except MediaError as err:\n"
        "        kinds.append(err.kind)\n"
        "print(','.join(kinds))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]  # -11: the decoder crashed the process
    kinds = done.stdout.strip().split(",")
    assert kinds[:2] == ["truncated", "truncated"] and kinds[2] in ("corrupt", "truncated")
    assert len(kinds) == len(cases) and kinds.count("ok") < 10


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "I;16", "RGB16"])
def test_png_pixels_match_torchvision_on_good_files(photos, mode):
    """PNGs decode through Pillow (see above); on good files the pixels are torchvision's."""
    im = Image.open(io.BytesIO(photos[2])).convert("RGB").resize((64, 48))
    buf = io.BytesIO()
    if mode == "I;16":
        grey = np.asarray(im.convert("L"), dtype=np.uint16) * 257 + 3  # every sample uses both bytes
        Image.fromarray(grey).save(buf, "PNG")
    elif mode == "RGB16":  # 16-bit RGB: Pillow cannot write it; build the file by hand
        rgb = (np.asarray(im, dtype=np.uint16) * 257 + 5).astype(">u2")
        buf.write(raw_png(64, 48, b"".join(b"\x00" + row.tobytes() for row in rgb), depth=16))
    else:
        (im.convert(mode) if mode != "RGBA" else im.convert("RGBA")).save(buf, "PNG")
    data = buf.getvalue()
    ours = decode_image_bytes(data, 10**7, 10**8)
    from torchvision.io import ImageReadMode

    theirs = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    if theirs.dtype != torch.uint8:
        theirs = TF.to_dtype(theirs, torch.uint8, scale=True)
    assert ours.dtype == torch.uint8 and ours.shape == theirs.shape == (3, 48, 64)
    assert torch.equal(ours, theirs)


def _transparent_square(fmt: str) -> bytes:
    """64x64, a red square in the middle of a fully transparent background whose hidden colour is black."""
    buf = io.BytesIO()
    if fmt == "GIF":  # a palette image whose colour 0 (black) is the transparent one
        im = Image.new("P", (64, 64), 0)
        im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        im.paste(1, (16, 16, 48, 48))
        im.save(buf, "GIF", transparency=0)
    else:
        im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        im.paste((255, 0, 0, 255), (16, 16, 48, 48))
        im.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_transparency_is_composited_onto_white_as_hugging_face_processors_do(fmt):
    """transformers' convert_to_rgb pastes transparency onto white; dropping the alpha channel showed the
    colour hidden under it (black here), so two images that look the same got different vectors."""
    rgb = decode_image_bytes(_transparent_square(fmt), 10**7, 10**7)
    assert rgb.shape == (3, 64, 64)
    assert rgb[:, 0, 0].tolist() == [255, 255, 255] and rgb[:, 32, 32].tolist() == [255, 0, 0]


def test_webp_exif_orientation_is_applied(photos):
    """A WebP tagged 'rotate 90' (orientation 6) comes out upright, as JPEG and PNG do."""
    im = Image.open(io.BytesIO(photos[0])).convert("RGB").resize((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "WEBP", exif=exif.tobytes(), lossless=True)
    assert decode_image_bytes(buf.getvalue(), 10**7, 10**7).shape == (3, 40, 20)
