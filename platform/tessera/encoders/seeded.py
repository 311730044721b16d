"""PLACEHOLDER image and audio weights: standard architectures with seeded random initialisation.

No pretrained image or audio weights can be downloaded in this environment, so the default image and
audio encoders use these. They are **not trained**: their vectors are deterministic functions of the
input with no semantic meaning beyond what a random network preserves. Each is written as a
self-describing folder in its library's own checkpoint layout, so the encoders load them exactly as
they would load real pretrained weights:

- ``image-resnet18-seeded/``: torchvision ResNet-18 — ``config.json`` (``library``, ``arch``,
  ``kwargs``), ``model.safetensors`` (the full state_dict, classifier included) and a Hugging Face
  style ``preprocessor_config.json`` (CLIP-style resize / centre-crop / ImageNet normalisation).
- ``audio-wav2vec2-seeded/``: a small ``Wav2Vec2Model`` (4 layers, hidden 256) saved with
  ``save_pretrained`` plus its ``Wav2Vec2FeatureExtractor`` config (16 kHz).

Every folder also gets a ``README.md`` that says "placeholder seeded weights" and, written last, a
``_MANIFEST.json`` (seed, per-file sha256, overall checksum as
:func:`~tessera.encoders.weights.weights_checksum` computes it).

Example::

    uris = write_seeded_weights("s3://tessera-demo/models/encoders", Storage(), seed=0)
    # {"image": "s3://tessera-demo/models/encoders/image-resnet18-seeded", "audio": ".../audio-wav2vec2-seeded"}
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

import torch

from tessera.encoders.weights import file_sha256, upload_folder, weight_files, weights_checksum
from tessera.storage import Storage, join_uri

DEFAULT_MODELS_URI = "s3://tessera-demo/models/encoders"
SEEDED_IMAGE_FOLDER = "image-resnet18-seeded"
SEEDED_AUDIO_FOLDER = "audio-wav2vec2-seeded"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_seeded_image(folder: Path, seed: int, image_size: int = 128) -> None:
    """Write a seeded torchvision ResNet-18 checkpoint folder (placeholder weights)."""
    import torchvision
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model("resnet18", weights=None, num_classes=1000)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    _write_json(folder / "config.json", {"library": "torchvision", "arch": "resnet18",
                                         "kwargs": {"num_classes": 1000}})
    _write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": image_size}, "resample": 2,
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
        "do_convert_rgb": True,
    })


def build_seeded_audio(folder: Path, seed: int, sample_rate: int = 16000) -> None:
    """Write a seeded small Wav2Vec2 checkpoint folder (placeholder weights)."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    config = Wav2Vec2Config(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        conv_dim=(256,) * 7, num_conv_pos_embeddings=64, num_conv_pos_embedding_groups=16,
        feat_extract_norm="layer", do_stable_layer_norm=True, apply_spec_augment=False,
        architectures=["Wav2Vec2Model"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Wav2Vec2Model(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=sample_rate, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(folder)


SEEDED_BUILDERS: dict[str, tuple[str, Callable[[Path, int], None]]] = {
    "image": (SEEDED_IMAGE_FOLDER, build_seeded_image),
    "audio": (SEEDED_AUDIO_FOLDER, build_seeded_audio),
}


def write_seeded_weights(out_uri: str, storage: Storage | None = None, seed: int = 0,
                         force: bool = False) -> dict[str, str]:
    """Write the placeholder image and audio weight folders under ``out_uri``.

    Args:
        out_uri: a local folder or ``s3://`` prefix; folders go to ``<out_uri>/<name>/``.
        storage: how to reach object storage (default: from the environment).
        seed: torch seed for the random initialisation (same seed, same bytes, same checksum).
        force: overwrite a folder that holds *different* weights (identical ones are kept as they are).

    Returns:
        ``{modality: folder URI}``.

    Raises:
        FileExistsError: a folder already holds different weights and ``force`` is False.
    """
    storage = storage or Storage()
    storage.ensure_bucket(out_uri)
    written = {}
    for modality, (name, build) in SEEDED_BUILDERS.items():
        dest = join_uri(out_uri, name)
        with tempfile.TemporaryDirectory(prefix=f"tessera-{name}-") as tmp:
            folder = Path(tmp)
            build(folder, seed)
            manifest = _finish_folder(folder, modality, seed)
            existing = _existing_checksum(storage, dest)
            if existing == manifest["checksum"]:
                written[modality] = dest
                continue
            if existing is not None and not force:
                raise FileExistsError(f"{dest} holds other weights ({existing}); overwrite it with force=True "
                                      "(jobs.make_models --force)")
            upload_folder(folder, dest, storage)
            storage.write_json(join_uri(dest, "_MANIFEST.json"), manifest)  # last: marks the folder complete
        written[modality] = dest
    return written


def _finish_folder(folder: Path, modality: str, seed: int) -> dict:
    (folder / "README.md").write_text(
        f"# {folder.name}: placeholder seeded weights\n\n"
        f"Placeholder seeded weights (torch seed {seed}), NOT trained: a standard {modality} architecture with "
        "random initialisation, stored in its library's own checkpoint layout so that real pretrained weights "
        "can replace it by changing the encoder config's `weights`. Written by `python -m jobs.make_models`.\n")
    manifest = {
        "kind": "placeholder seeded weights",
        "modality": modality,
        "seed": seed,
        "files": {p.relative_to(folder).as_posix(): file_sha256(p) for p in weight_files(folder)},
        "checksum": weights_checksum(folder),
    }
    return manifest


def _existing_checksum(storage: Storage, dest: str) -> str | None:
    uri = join_uri(dest, "_MANIFEST.json")
    if not storage.exists(uri):
        return None
    return storage.read_json(uri).get("checksum")


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
