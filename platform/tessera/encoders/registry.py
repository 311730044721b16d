"""Pick the encoder classes for a config: one entry point for all three modalities.

Example::

    cfg = ImageEncoderConfig(weights="s3://tessera-demo/models/encoders/image-resnet18-seeded")
    prep = shared_preprocessor(cfg)   # in CPU tasks: one per config per worker process
    enc = load_encoder(cfg)           # in the actor pool
"""

from __future__ import annotations

import functools
from typing import Annotated, Union

from pydantic import Field

from tessera.encoders.audio import AudioEncoder, AudioEncoderConfig, AudioPreprocessor
from tessera.encoders.base import Encoder, EncoderConfig, Preprocessor
from tessera.encoders.image import ImageEncoder, ImageEncoderConfig, ImagePreprocessor
from tessera.encoders.text import TextEncoder, TextEncoderConfig, TextPreprocessor
from tessera.storage import Storage, StorageConfig

# A config field that accepts any of the three, told apart by its ``modality`` key.
AnyEncoderConfig = Annotated[Union[TextEncoderConfig, ImageEncoderConfig, AudioEncoderConfig],
                             Field(discriminator="modality")]

ENCODERS: dict[type[EncoderConfig], tuple[type[Preprocessor], type[Encoder]]] = {
    TextEncoderConfig: (TextPreprocessor, TextEncoder),
    ImageEncoderConfig: (ImagePreprocessor, ImageEncoder),
    AudioEncoderConfig: (AudioPreprocessor, AudioEncoder),
}


def _classes(config: EncoderConfig) -> tuple[type[Preprocessor], type[Encoder]]:
    try:
        return ENCODERS[type(config)]
    except KeyError:
        raise TypeError(f"no encoder for config type {type(config).__name__}") from None


def load_preprocessor(config: EncoderConfig, storage: Storage | None = None) -> Preprocessor:
    """The preprocessing side for ``config`` (loads tokenizer / preprocessing config lazily)."""
    return _classes(config)[0](config, storage)


def load_encoder(config: EncoderConfig, storage: Storage | None = None) -> Encoder:
    """The encoding side for ``config``: resolves the weights and loads the model once."""
    return _classes(config)[1](config, storage)


def shared_preprocessor(config: EncoderConfig, storage: Storage | None = None) -> Preprocessor:
    """One preprocessor per (config, storage settings) per process, reused across calls.

    Ray reuses worker processes across tasks, so a batch function that calls this instead of
    constructing a preprocessor per batch resolves the weights and loads the tokenizer once per worker.
    """
    storage_json = (storage.config if storage is not None else StorageConfig()).model_dump_json()
    return _shared(type(config), config.model_dump_json(), storage_json)


@functools.lru_cache(maxsize=16)
def _shared(config_cls: type[EncoderConfig], config_json: str, storage_json: str) -> Preprocessor:
    config = config_cls.model_validate_json(config_json)
    return load_preprocessor(config, Storage(StorageConfig.model_validate_json(storage_json)))
