"""Pick the encoder classes for a config: one entry point for all three modalities.

Example::

    cfg = ImageEncoderConfig(weights="s3://tessera-demo/models/encoders/image-resnet18-seeded")
    prep = shared_preprocessor(cfg)   # in CPU tasks: one per config per worker process
    enc = load_encoder(cfg)           # in the actor pool
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

from tessera.storage import Storage, StorageConfig

if TYPE_CHECKING:
    from tessera.encoders.base import Encoder, EncoderConfig, Preprocessor

# modality -> (module, preprocessor class, encoder class); a module is imported only when its
# modality is used, so a text task does not pay for torchvision and the audio model classes.
ENCODERS: dict[str, tuple[str, str, str]] = {
    "text": ("tessera.encoders.text", "TextPreprocessor", "TextEncoder"),
    "image": ("tessera.encoders.image", "ImagePreprocessor", "ImageEncoder"),
    "audio": ("tessera.encoders.audio", "AudioPreprocessor", "AudioEncoder"),
}


def __getattr__(name: str):
    if name == "AnyEncoderConfig":  # built on first use: it needs all three config classes
        from typing import Annotated, Union

        from pydantic import Field

        from tessera.encoders.audio import AudioEncoderConfig
        from tessera.encoders.image import ImageEncoderConfig
        from tessera.encoders.text import TextEncoderConfig

        # A config field that accepts any of the three, told apart by its ``modality`` key.
        return Annotated[Union[TextEncoderConfig, ImageEncoderConfig, AudioEncoderConfig],
                         Field(discriminator="modality")]
    raise AttributeError(f"module 'tessera.encoders.registry' has no attribute {name!r}")


def _classes(config: EncoderConfig) -> tuple[type[Preprocessor], type[Encoder]]:
    try:
        module, pre, enc = ENCODERS[getattr(config, "modality", None)]
    except KeyError:
        raise TypeError(f"no encoder for config type {type(config).__name__}") from None
    mod = importlib.import_module(module)
    return getattr(mod, pre), getattr(mod, enc)


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
def _shared(config_cls: type, config_json: str, storage_json: str) -> Preprocessor:
    config = config_cls.model_validate_json(config_json)
    return load_preprocessor(config, Storage(StorageConfig.model_validate_json(storage_json)))
