"""Audio encoder: raw-waveform transformer (Wav2Vec2 family) with mean / max pooling over frames.

The default weights are a **placeholder**: a small Wav2Vec2 (4 layers, hidden 256) with seeded random
weights written by ``python -m jobs.make_models`` (no pretrained audio weights can be downloaded here).
They load with ``AutoModel.from_pretrained`` and the feature-extractor settings in
``preprocessor_config.json`` exactly as a pretrained checkpoint does, so pointing ``weights`` at a real
wav2vec2 / HuBERT / WavLM folder is a config change.

Preprocessing decodes, downmixes, resamples to the checkpoint's rate, keeps the first ``clip_seconds``
(decoding only the source frames those need) and (if the checkpoint says ``do_normalize``) scales it to
zero mean and unit variance; it ships the unpadded clip. ``encode`` zero-pads every clip to the full
``clip_seconds`` (so a clip's vector never depends on its batch-mates) and pools only the frames that
cover real samples.

Example::

    enc = AudioEncoder(AudioEncoderConfig(weights="s3://tessera-demo/models/encoders/audio-wav2vec2-seeded"))
    vecs = enc.embed([Path("0_george_0.wav").read_bytes()])     # (1, 256)
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from tessera.encoders.audio_decode import decode_audio_bytes
from tessera.encoders.base import Encoder, EncoderConfig, Preprocessor
from tessera.encoders.errors import MediaError
from tessera.encoders.padding import pad_right
from tessera.encoders.pooling import pool_sequence
from tessera.encoders.seeded import DEFAULT_MODELS_URI, SEEDED_AUDIO_FOLDER
from tessera.encoders.weights import CheckpointFiles, pretrained_config
from tessera.storage import join_uri

PREPROCESSOR_FILE = "preprocessor_config.json"


class AudioEncoderConfig(EncoderConfig):
    """Audio encoder settings.

    Args:
        weights: default: the placeholder seeded Wav2Vec2 that ``jobs.make_models`` writes.
        pooling: ``mean`` or ``max`` over the frames covering real (unpadded) audio.
        sample_rate: None uses the checkpoint's ``sampling_rate``; a value must agree with it
            (it is only needed for checkpoints that do not state one).
        clip_seconds: audio kept per item (from the start); shorter items are zero-padded.
        max_bytes: larger objects are ``oversized``.

    Example::

        AudioEncoderConfig(weights="/models/wav2vec2-base", pooling="mean", clip_seconds=4.0)
    """

    modality: Literal["audio"] = "audio"
    weights: str = join_uri(DEFAULT_MODELS_URI, SEEDED_AUDIO_FOLDER)
    pooling: Literal["mean", "max"] = "mean"
    sample_rate: int | None = Field(None, ge=1000, le=192_000)
    clip_seconds: float = Field(1.0, gt=0, le=600)
    max_bytes: int = Field(20_000_000, ge=1)
    batch_size: int = Field(32, ge=1, le=4096)


def checkpoint_features(files: CheckpointFiles) -> dict:
    """The folder's feature-extractor settings (``preprocessor_config.json``).

    Raises:
        FileNotFoundError: the folder has no such file.
        ValueError: it is not a JSON object (the message names the file).
    """
    cfg = files.json(PREPROCESSOR_FILE)
    if cfg is None:
        raise FileNotFoundError(f"{files.location} has no {PREPROCESSOR_FILE}")
    return cfg


def checkpoint_sample_rate(features: dict, wanted: int | None, where: str) -> int:
    """The rate to resample to: ``wanted`` (the config's ``sample_rate``) or the ``sampling_rate`` the
    feature settings ``features`` state (read from ``where``); raises ``ValueError`` when they disagree or
    neither is given."""
    stated = features.get("sampling_rate")
    if stated is not None and wanted is not None and int(stated) != wanted:
        raise ValueError(f"sample_rate {wanted} disagrees with the sampling_rate {stated} in {where}")
    rate = wanted if wanted is not None else stated
    if rate is None:
        raise ValueError(f"{where} states no sampling_rate: set sample_rate in the config")
    return int(rate)


def check_waveform_model(model_config, where: str) -> None:
    """Refuse a transformers model config (read from ``where``) that is not a raw-waveform model with a
    convolutional feature encoder, whose frames the encoder pools."""
    if not (hasattr(model_config, "conv_kernel") and hasattr(model_config, "conv_stride")):
        raise ValueError(f"{where}: a {model_config.model_type} model; the audio encoder needs a raw-waveform "
                         "model with a convolutional feature encoder (wav2vec2, HuBERT, WavLM)")


class AudioPreprocessor(Preprocessor[AudioEncoderConfig]):
    """Audio bytes -> ``float32`` waveform ``(T,)`` with ``T <= clip_samples``, at ``sample_rate``.

    Example::

        clip = AudioPreprocessor(cfg)(wav_bytes)    # (≤16000,) float32
    """

    @functools.cached_property
    def feature_config(self) -> dict:
        return checkpoint_features(CheckpointFiles(self.weights_dir))

    @functools.cached_property
    def sample_rate(self) -> int:
        where = CheckpointFiles(self.weights_dir).where(PREPROCESSOR_FILE)
        return checkpoint_sample_rate(self.feature_config, self.config.sample_rate, where)

    def setup(self) -> None:
        _ = self.feature_config, self.sample_rate

    @property
    def clip_samples(self) -> int:
        return max(1, round(self.config.clip_seconds * self.sample_rate))

    def __call__(self, raw: bytes | None) -> np.ndarray:
        if raw is None:
            raise MediaError("missing", "no audio bytes")
        # decodes only the source frames the first clip_samples outputs need
        clip = decode_audio_bytes(bytes(raw), self.config.max_bytes, self.sample_rate,
                                  max_samples=self.clip_samples)  # (T,) T <= clip_samples
        if self.feature_config.get("do_normalize", False):
            # as Wav2Vec2FeatureExtractor: zero mean, unit variance per utterance
            clip = (clip - clip.mean()) / np.sqrt(clip.var() + 1e-7)
        return clip.astype(np.float32, copy=False)


def conv_output_length(samples: torch.Tensor, kernels: list[int], strides: list[int]) -> torch.Tensor:
    """Frames a stack of 1-D convolutions (no padding) produces from ``samples`` inputs."""
    for k, s in zip(kernels, strides, strict=True):
        samples = torch.div(samples - k, s, rounding_mode="floor") + 1
    return samples.clamp(min=1)


class AudioEncoder(Encoder[AudioEncoderConfig]):
    """Waveform clips -> unit vectors through a Wav2Vec2-style model and frame pooling.

    Example::

        enc = AudioEncoder(AudioEncoderConfig(weights="/tmp/models/audio-wav2vec2-seeded", device="cpu"))
        vecs = enc.encode(enc.preprocessor.map([wav_a, wav_b]))     # (2, 256)
    """

    modality = "audio"
    preprocessor_class = AudioPreprocessor

    @classmethod
    def check_checkpoint(cls, config: AudioEncoderConfig, files: CheckpointFiles) -> None:
        """``preprocessor_config.json`` and the sample rate as the preprocessing reads them, ``config.json``
        as ``AutoModel`` reads it, and that it describes a raw-waveform model."""
        checkpoint_sample_rate(checkpoint_features(files), config.sample_rate, files.where(PREPROCESSOR_FILE))
        model_config = pretrained_config(files)
        if model_config is not None:  # None: the folder brings its own config class
            check_waveform_model(model_config, files.where("config.json"))

    def _load_model(self) -> torch.nn.Module:
        from transformers import AutoModel  # here, not at import: a decode task needs no transformers

        model = AutoModel.from_pretrained(self.weights_dir, local_files_only=True)
        cfg = model.config
        check_waveform_model(cfg, CheckpointFiles(self.weights_dir).where("config.json"))
        self._kernels, self._strides = list(cfg.conv_kernel), list(cfg.conv_stride)
        self._use_mask = bool(self.preprocessor.feature_config.get("return_attention_mask", False))
        self._pad_value = float(self.preprocessor.feature_config.get("padding_value", 0.0))
        return model

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def _forward(self, items: list[np.ndarray]) -> torch.Tensor:
        wave, valid, lengths = pad_right(items, self.preprocessor.clip_samples, self._pad_value, np.float32)  # (b, T)
        wave, sample_mask = torch.from_numpy(wave).to(self._device), torch.from_numpy(valid).to(self._device)
        lengths = torch.from_numpy(lengths)  # (b,)
        kwargs = {"attention_mask": sample_mask.long()} if self._use_mask else {}
        hidden = self.model(input_values=wave, **kwargs).last_hidden_state  # (b, F, D)
        frames = conv_output_length(lengths, self._kernels, self._strides).to(self._device)  # (b,)
        frame_mask = torch.arange(hidden.shape[1], device=self._device).unsqueeze(0) < frames.unsqueeze(1)  # (b, F)
        return pool_sequence(hidden, frame_mask, self.config.pooling)  # (b, D)
