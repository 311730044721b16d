"""Image encoder: decode with torchvision, resize / crop / normalise per the checkpoint, pool a backbone.

The default weights are a **placeholder**: a torchvision ResNet-18 with seeded random weights written
by ``python -m jobs.make_models`` (no pretrained image weights can be downloaded here). They load
through the same path as a real checkpoint, so pointing ``weights`` at a pretrained torchvision
ResNet folder or a Hugging Face vision model (e.g. a CLIP vision tower) is a config change.

Preprocessing follows the checkpoint's ``preprocessor_config.json`` (Hugging Face image-processor
keys: ``size``, ``crop_size``, ``do_center_crop``, ``image_mean``, ``image_std``, ``resample``,
``rescale_factor``), read as the ``image_processor_type`` it names reads it (an integer ``size``, the
class's defaults for keys left out, ConvNeXt's ``crop_pct``; what the transform cannot reproduce is
refused naming the file), and ships ``uint8`` pixels ``(3, H, W)``, 4x smaller than floats; the encoder
rescales and normalises on its device.

Example::

    enc = ImageEncoder(ImageEncoderConfig(weights="s3://tessera-demo/models/encoders/image-resnet18-seeded"))
    vecs = enc.embed([Path("apple.jpg").read_bytes()])     # (1, 512)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from tessera.encoders.base import Encoder, EncoderConfig, Preprocessor
from tessera.encoders.errors import MediaError
from tessera.encoders.image_decode import decode_image_bytes
from tessera.encoders.pooling import pool_features
from tessera.encoders.seeded import DEFAULT_MODELS_URI, SEEDED_IMAGE_FOLDER
from tessera.encoders.vision_backbone import check_vision_backbone, load_vision_backbone
from tessera.encoders.weights import CheckpointFiles
from tessera.storage import join_uri

PREPROCESSOR_FILE = "preprocessor_config.json"
# PIL resample codes used by Hugging Face image processors.
_RESAMPLE = {0: InterpolationMode.NEAREST, 2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC}
# The resize may make an axis at most this many times the crop: beyond it the source is first trimmed
# to the middle the centre crop keeps (see ``trim_for_crop``), so a 4000x1 banner costs what a square
# photo does. Images up to 4:1 (square crop) never reach it and go through resize + crop unchanged.
MAX_RESIZE_OVER_CROP = 4


class ImageEncoderConfig(EncoderConfig):
    """Image encoder settings.

    Args:
        weights: default: the placeholder seeded ResNet-18 that ``jobs.make_models`` writes.
        pooling: ``avg`` or ``max`` over the backbone's feature map (or tokens).
        image_size: resize the shorter side to this and centre-crop a square of it; None uses the
            checkpoint's own sizes (128 for the seeded ResNet-18).
        max_bytes: larger objects are ``oversized``.
        max_pixels: images whose header declares more pixels are ``oversized`` (decompression-bomb guard).
        channels_last: run the backbone in ``torch.channels_last`` memory format (weights and
            inputs), whatever layout the pixels arrive in. oneDNN's convolution, batch-norm and
            pooling kernels are faster on it: seeded ResNet-18 on this CPU, 128 px, 32 a batch, bf16:
            1.4x the images/s of NCHW-contiguous inputs on 1 thread, 1.26x on 2. Pixels that crossed
            a process boundary (the embedding job) arrive contiguous, so the format is set here.

    Example::

        ImageEncoderConfig(weights="/models/clip-vit-b32-vision", pooling="avg", image_size=224)
    """

    modality: Literal["image"] = "image"
    weights: str = join_uri(DEFAULT_MODELS_URI, SEEDED_IMAGE_FOLDER)
    pooling: Literal["avg", "max"] = "avg"
    image_size: int | None = Field(None, ge=16, le=4096)
    max_bytes: int = Field(20_000_000, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    batch_size: int = Field(32, ge=1, le=4096)
    channels_last: bool = True


@dataclass(frozen=True)
class ImageTransform:
    """Resize (shorter side to ``resize``, or exactly to ``(h, w)``), centre-crop, then normalise."""

    resize: int | tuple[int, int]
    crop: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale: float
    interpolation: InterpolationMode

    @property
    def output_size(self) -> tuple[int, int]:
        return self.crop if self.crop is not None else self.resize  # type: ignore[return-value]

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` the resize produces from a ``height x width`` image, as torchvision computes it."""
        if not isinstance(self.resize, int):
            return self.resize
        if width <= height:
            return int(self.resize * height / width), self.resize
        return self.resize, int(self.resize * width / height)

    @classmethod
    def from_checkpoint(cls, cfg: dict, image_size: int | None) -> ImageTransform:
        """Read Hugging Face image-processor keys; ``image_size`` overrides resize and crop.

        A config naming its ``image_processor_type`` is read as that class reads it (:func:`resolved_config`):
        an integer ``size`` is the shorter side for some processors (CLIP, SigLIP, BiT) and a square for
        others (ViT, DeiT); keys left out take the class's defaults (bicubic, its mean and std), and
        ConvNeXt's ``crop_pct`` rule is followed.

        Raises:
            ValueError: what the transform cannot reproduce (a resize rule of its own, a resampling filter
                tensors lack, no resize), or an integer ``size`` whose meaning no processor type decides."""
        cfg = resolved_config(cfg)
        if image_size is not None:
            resize, crop_hw = image_size, (image_size, image_size)
        else:
            if cfg.get("do_resize", True) is False:
                raise ValueError("do_resize false: images of every size would reach the model; set image_size")
            resize = _parse_size(cfg.get("size"), "size")
            crop = cfg.get("crop_size") if cfg.get("do_center_crop", True) else None
            # an integer crop_size is a square for every processor
            crop_hw = (crop, crop) if isinstance(crop, int) else _parse_size(crop, "crop_size") if crop else None
            if isinstance(crop_hw, int):  # {"shortest_edge": n} as a crop: a square
                crop_hw = (crop_hw, crop_hw)
            if crop_hw is None and isinstance(resize, int):
                raise ValueError("preprocessing config resizes the shorter side without a crop: "
                                 "outputs would differ in shape; set crop_size or image_size")
        normalize = cfg.get("do_normalize", True)
        resample = cfg.get("resample", 2)
        if int(resample) not in _RESAMPLE:
            raise ValueError(f"resample {int(resample)} ({_PIL_FILTERS.get(int(resample), 'unknown')}): tensors resize "
                             "with nearest (0), bilinear (2) or bicubic (3) only")
        return cls(resize=resize, crop=crop_hw,
                   mean=tuple(cfg.get("image_mean", (0.0, 0.0, 0.0))) if normalize else (0.0, 0.0, 0.0),
                   std=tuple(cfg.get("image_std", (1.0, 1.0, 1.0))) if normalize else (1.0, 1.0, 1.0),
                   rescale=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0,
                   interpolation=_RESAMPLE[int(resample)])


_PIL_FILTERS = {1: "Lanczos", 4: "box", 5: "Hamming"}
_PROCESSOR_KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                   "do_normalize", "image_mean", "image_std")


def resolved_config(cfg: dict) -> dict:
    """``cfg`` as the Hugging Face image processor it names (``image_processor_type``) reads it: sizes as
    dicts (an integer ``size`` is a shorter side or a square depending on the class), the class's defaults
    for keys left out. A config without a type, or one naming a class transformers lacks, is returned as it
    is. ConvNeXt's ``crop_pct`` (shorter side to ``size / crop_pct``, then a centre crop of ``size``; a
    square warp from 384 up) is turned into the equivalent resize and crop.

    Raises:
        ValueError: a processor whose resize rule the transform does not reproduce (``crop_pct`` of another
            class than ConvNeXt, LeViT's)."""
    name = cfg.get("image_processor_type") or str(cfg.get("feature_extractor_type") or "").replace(
        "FeatureExtractor", "ImageProcessor")
    kind = str(name).removesuffix("Fast").removesuffix("ImageProcessor")
    if not name or (_explicit(cfg) and kind not in _OWN_RULES):
        return cfg  # nothing for the class to decide (and no transformers import: 1.3 s, 70 MB a process)
    import transformers

    processor_class = getattr(transformers, str(name).removesuffix("Fast"), None)
    if processor_class is None:
        return cfg
    processor = processor_class.from_dict({k: v for k, v in cfg.items() if not k.endswith("_type")})
    out = dict(cfg)
    for key in _PROCESSOR_KEYS:
        value = getattr(processor, key, None)
        if value is not None:
            out[key] = _plain(value)
    crop_pct = getattr(processor, "crop_pct", None)
    if kind == "Levit" or (crop_pct is not None and kind != "ConvNext"):
        rule = f"crop_pct {crop_pct}" if crop_pct is not None else "LeViT's"
        raise ValueError(f"{name} resizes by a rule of its own ({rule}) that the transform does not reproduce; "
                         "set image_size to resize and crop to a square")
    if kind == "ConvNext":
        if "shortest_edge" not in out["size"]:
            raise ValueError(f"{name} takes size as {{\"shortest_edge\": n}}, got {out['size']}")
        edge = int(out["size"]["shortest_edge"])
        if edge < 384:  # as ConvNextImageProcessor.resize: shorter side to edge / crop_pct, centre crop edge
            out.update(size={"shortest_edge": int(edge / (crop_pct or 224 / 256))},
                       crop_size={"height": edge, "width": edge}, do_center_crop=True)
        else:  # warped to a square, no crop
            out.update(size={"height": edge, "width": edge}, do_center_crop=False)
    return out


_OWN_RULES = {"ConvNext", "Levit", "PoolFormer"}  # resize rules beyond size / crop_size: always read by the class


def _explicit(cfg: dict) -> bool:
    """Whether ``cfg`` leaves no key to a processor class: sizes as dicts, every other key set."""
    crop = cfg.get("do_center_crop") is False or isinstance(cfg.get("crop_size"), (dict, int))
    return (isinstance(cfg.get("size"), dict) and crop and "crop_pct" not in cfg
            and all(k in cfg for k in _PROCESSOR_KEYS if k not in ("size", "crop_size")))


def _plain(value):
    """A processor attribute as JSON-like data: a ``SizeDict`` as a dict of its set keys, an enum as its value."""
    if hasattr(value, "shortest_edge") and hasattr(value, "height"):  # transformers' SizeDict (unset keys None)
        return {k: int(v) for k, v in vars(value).items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return getattr(value, "value", value)


def _parse_size(size, key: str) -> int | tuple[int, int]:
    if isinstance(size, int):
        raise ValueError(f"{key} {size}: an integer is the shorter side for some image processors and a square "
                         "for others; name the image_processor_type, or write {\"shortest_edge\": "
                         f"{size}}} or {{\"height\": {size}, \"width\": {size}}}")
    if isinstance(size, dict) and "shortest_edge" in size:
        return int(size["shortest_edge"])
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    raise ValueError(f"unsupported {key}: {size!r}")


def checkpoint_transform(files: CheckpointFiles, image_size: int | None) -> ImageTransform:
    """The transform the folder's ``preprocessor_config.json`` describes (``image_size`` overriding its sizes).

    Raises:
        FileNotFoundError: the folder has no such file.
        ValueError: it is not a JSON object, or asks for what the transform does not do; the message
            names the file.
    """
    cfg = files.json(PREPROCESSOR_FILE)
    if cfg is None:
        raise FileNotFoundError(f"{files.location} has no {PREPROCESSOR_FILE}")
    try:
        return ImageTransform.from_checkpoint(cfg, image_size)
    except (TypeError, ValueError) as err:  # TypeError: a value of another type (a number for image_mean)
        raise ValueError(f"{files.where(PREPROCESSOR_FILE)}: {err}") from err


class ImagePreprocessor(Preprocessor[ImageEncoderConfig]):
    """Image bytes -> ``uint8`` pixels ``(3, H, W)`` at the model's input size.

    Decoding is bounded by ``max_pixels`` and resizing by the output size, whatever the aspect ratio
    (see :func:`trim_for_crop`).

    Example::

        pixels = ImagePreprocessor(cfg)(jpeg_bytes)    # (3, 128, 128) uint8
    """

    @functools.cached_property
    def transform(self) -> ImageTransform:
        return checkpoint_transform(CheckpointFiles(self.weights_dir), self.config.image_size)

    def setup(self) -> None:
        _ = self.transform

    def __call__(self, raw: bytes | None) -> np.ndarray:
        if raw is None:
            raise MediaError("missing", "no image bytes")
        t = self.transform
        img = decode_image_bytes(bytes(raw), self.config.max_bytes, self.config.max_pixels)  # (3, H, W)
        size = t.resized_size(img.shape[-2], img.shape[-1])
        if t.crop is not None:
            img, size = trim_for_crop(img, size, t.crop)  # (3, H', W'), H' <= H, W' <= W
        img = TF.resize(img, list(size), interpolation=t.interpolation, antialias=True)  # (3, h', w')
        if t.crop is not None:
            img = TF.center_crop(img, list(t.crop))  # (3, ch, cw)
        return img.numpy()


def trim_for_crop(img: torch.Tensor, size: tuple[int, int],
                  crop: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Centre-trim the source along any axis the resize would stretch past ``MAX_RESIZE_OVER_CROP`` crops.

    Resizing the shorter side first makes the long side of an extreme aspect ratio huge (a 4000x1 PNG
    becomes 128x512000 before a 128x128 crop). The trimmed source keeps the middle that the crop takes
    with a margin of 1.5 crops on each side; its resize target keeps the scale and its offset puts the
    crop's first pixel where it was, up to half a *source* pixel (none when the scale divides evenly):
    for an upscaled thin banner (1x1001) that is many output pixels, for a photo-like panorama a
    fraction of one. Axes within the bound are left alone.

    Args:
        img: ``(3, H, W)`` source pixels.
        size: ``(h, w)`` the resize would produce from the whole image.
        crop: ``(ch, cw)`` the centre crop that follows.

    Returns:
        The trimmed image (a view) and its resize target, each axis at most ``MAX_RESIZE_OVER_CROP``
        crops (rounded) when it was trimmed.

    Example::

        trim_for_crop(torch.zeros(3, 1, 4000, dtype=torch.uint8), (128, 512000), (128, 128))
        # -> (a (3, 1, 4) view, (128, 512))
    """
    target = list(size)
    for axis in (0, 1):
        source, limit = img.shape[axis + 1], MAX_RESIZE_OVER_CROP * crop[axis]
        if target[axis] > limit:
            scale = source / target[axis]  # source pixels per resized pixel
            keep = min(source, math.ceil(limit * scale))
            trimmed = round(keep / scale)
            # the offset that puts the crop's first pixel on the source position it had untrimmed
            start = round(_crop_anchor(target[axis], crop[axis]) * scale
                          - _crop_anchor(trimmed, crop[axis]) * keep / trimmed)
            img = img.narrow(axis + 1, min(max(start, 0), source - keep), keep)
            target[axis] = trimmed
    return img, (target[0], target[1])


def _crop_anchor(size: int, crop: int) -> int:
    """First pixel ``TF.center_crop`` keeps along an axis of ``size``."""
    return int(round((size - crop) / 2.0))


class ImageEncoder(Encoder[ImageEncoderConfig]):
    """``uint8`` pixels -> unit vectors through a vision backbone and avg / max pooling.

    Example::

        enc = ImageEncoder(ImageEncoderConfig(weights="/tmp/models/image-resnet18-seeded", device="cpu"))
        vecs = enc.encode(enc.preprocessor.map([jpeg_a, jpeg_b]))    # (2, 512)
    """

    modality = "image"
    preprocessor_class = ImagePreprocessor

    @classmethod
    def check_checkpoint(cls, config: ImageEncoderConfig, files: CheckpointFiles) -> None:
        """``preprocessor_config.json`` as the preprocessing reads it, ``config.json`` as the backbone
        loading reads it (:func:`~tessera.encoders.vision_backbone.check_vision_backbone`)."""
        checkpoint_transform(files, config.image_size)
        check_vision_backbone(files)

    def _load_model(self) -> torch.nn.Module:
        t = self.preprocessor.transform
        self._mean = torch.tensor(t.mean, device=self._device).view(1, -1, 1, 1)  # (1, 3, 1, 1)
        self._std = torch.tensor(t.std, device=self._device).view(1, -1, 1, 1)  # (1, 3, 1, 1)
        backbone = load_vision_backbone(self.weights_dir)
        return backbone.to(memory_format=torch.channels_last) if self.config.channels_last else backbone

    @functools.cached_property
    def dim(self) -> int:
        h, w = self.preprocessor.transform.output_size
        with torch.inference_mode():
            return int(self._forward([np.zeros((3, h, w), dtype=np.uint8)]).shape[-1])

    def _forward(self, items: list[np.ndarray]) -> torch.Tensor:
        pixels = torch.from_numpy(np.stack(items)).to(self._device)  # (b, 3, H, W) uint8
        if self.config.channels_last:  # elementwise ops below keep the layout
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        x = (pixels.float() * self.preprocessor.transform.rescale - self._mean) / self._std  # (b, 3, H, W)
        features = self.model(x)  # (b, C, h, w) or (b, L, D)
        return pool_features(features, self.config.pooling)  # (b, C)
