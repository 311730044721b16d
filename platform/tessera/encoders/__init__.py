"""Encoders: raw text / image / audio -> L2-normalised float32 vectors, single-process, no Ray.

One interface, three implementations. Each modality has a config (``*EncoderConfig``), a
``*Preprocessor`` (raw input -> numpy model input, CPU only, raises :class:`MediaError` for bad input)
and an ``*Encoder`` (loads the model once; ``encode(list of arrays) -> (N, D)``). The Ray Data
pipeline calls preprocessors in CPU tasks and encoders in actor pools.

The text encoder is the real all-MiniLM-L6-v2. The default image (ResNet-18) and audio (small
Wav2Vec2) weights are placeholder seeded weights written by ``python -m jobs.make_models``.

Example::

    from tessera.encoders import TextEncoderConfig, load_encoder
    enc = load_encoder(TextEncoderConfig())
    vectors = enc.embed(["red apple", "green pear"])      # (2, 384) float32, unit rows
"""

import importlib
from typing import TYPE_CHECKING

# Exports resolve on first use (PEP 562): a Ray task that needs only the light parts (errors,
# fetch_media, weights) does not import torch, torchvision and transformers with the package.
_EXPORTS = {
    "tessera.encoders.audio": ("AudioEncoder", "AudioEncoderConfig", "AudioPreprocessor"),
    "tessera.encoders.base": ("Encoder", "EncoderConfig", "Preprocessor"),
    "tessera.encoders.errors": ("MEDIA_ERROR_KINDS", "MediaError", "fetch_media"),
    "tessera.encoders.image": ("ImageEncoder", "ImageEncoderConfig", "ImagePreprocessor"),
    "tessera.encoders.registry": ("AnyEncoderConfig", "load_encoder", "load_preprocessor", "shared_preprocessor"),
    "tessera.encoders.seeded": ("write_seeded_weights",),
    "tessera.encoders.text": ("TextEncoder", "TextEncoderConfig", "TextPreprocessor"),
    "tessera.encoders.weights": ("ResolvedWeights", "resolve_weights", "weights_checksum"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "AnyEncoderConfig", "AudioEncoder", "AudioEncoderConfig", "AudioPreprocessor", "Encoder", "EncoderConfig",
    "ImageEncoder", "ImageEncoderConfig", "ImagePreprocessor", "MEDIA_ERROR_KINDS", "MediaError", "Preprocessor",
    "ResolvedWeights", "TextEncoder", "TextEncoderConfig", "TextPreprocessor", "fetch_media", "load_encoder",
    "load_preprocessor", "resolve_weights", "shared_preprocessor", "weights_checksum", "write_seeded_weights",
]


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'tessera.encoders' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from tessera.encoders.audio import AudioEncoder, AudioEncoderConfig, AudioPreprocessor
    from tessera.encoders.base import Encoder, EncoderConfig, Preprocessor
    from tessera.encoders.errors import MEDIA_ERROR_KINDS, MediaError, fetch_media
    from tessera.encoders.image import ImageEncoder, ImageEncoderConfig, ImagePreprocessor
    from tessera.encoders.registry import AnyEncoderConfig, load_encoder, load_preprocessor, shared_preprocessor
    from tessera.encoders.seeded import write_seeded_weights
    from tessera.encoders.text import TextEncoder, TextEncoderConfig, TextPreprocessor
    from tessera.encoders.weights import ResolvedWeights, resolve_weights, weights_checksum
