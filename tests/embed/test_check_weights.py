"""The embedding job's driver-side weights check (``check_weights``): a weights folder whose configuration
files the encoder cannot use is refused before any work, naming the key and the file, whether the folder
is an ``s3://`` prefix (its small files read from the real S3 store, nothing downloaded) or a local folder;
valid folders pass, and every refusal is one the encoder itself makes when it loads the folder."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tessera.embed.pipeline import ENCODERS, EmbeddingInputError, check_weights
from tessera.encoders.seeded import SEEDED_AUDIO_FOLDER, SEEDED_IMAGE_FOLDER, write_seeded_weights
from tessera.encoders.text import packaged_minilm_path
from tessera.encoders.weights import upload_folder
from tessera.storage import join_uri
from tests.conftest import embed_config

TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 37, "architectures": ["BertModel"]}


@pytest.fixture(scope="module")
def seeded_folders(tmp_path_factory) -> dict[str, Path]:
    """The placeholder image and audio weights (seed 0) in a local folder, as ``jobs.make_models`` writes them."""
    root = tmp_path_factory.mktemp("seeded")
    write_seeded_weights(str(root), seed=0)
    return {"image": root / SEEDED_IMAGE_FOLDER, "audio": root / SEEDED_AUDIO_FOLDER,
            "text": Path(packaged_minilm_path())}


def variant(src: Path, dst: Path, drop: tuple[str, ...] = (), write: dict[str, str] | None = None) -> Path:
    """A copy of the weights folder ``src`` (links to its files) without the files ``drop`` and with the
    files ``write`` (relative path -> text) replaced."""
    shutil.copytree(src, dst, copy_function=os.symlink)
    for name in [*drop, *(write or {})]:
        (dst / name).unlink(missing_ok=True)
    for name, text in (write or {}).items():
        (dst / name).write_text(text)
    return dst


def minilm_modules(extra: str) -> str:
    modules = json.loads((Path(packaged_minilm_path()) / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_X", "type": f"sentence_transformers.models.{extra}"})
    return json.dumps(modules)


def minilm_pooling(**modes: bool) -> str:
    return json.dumps({**json.loads((Path(packaged_minilm_path()) / "1_Pooling" / "config.json").read_text()), **modes})


# modality, files dropped, files written, what the refusal says after "<modality>.encoder.weights: <folder>"
BROKEN = {
    "image-no-preprocessor-config": ("image", ("preprocessor_config.json",), {},
                                     r" has no preprocessor_config\.json"),
    "image-squeezenet-backbone": ("image", (), {"config.json": json.dumps({"library": "torchvision",
                                                                          "arch": "squeezenet1_0"})},
                                  r"/config\.json: torchvision arch 'squeezenet1_0' is not supported as a backbone"),
    "image-size-without-crop": ("image", (), {"preprocessor_config.json": json.dumps(
        {"size": {"shortest_edge": 128}, "do_center_crop": False})},
                                r"/preprocessor_config\.json: preprocessing config resizes the shorter side "
                                r"without a crop"),
    "audio-text-model": ("audio", (), {"config.json": json.dumps(TINY_BERT)},
                         r"/config\.json: a bert model; the audio encoder needs a raw-waveform model"),
    "audio-truncated-feature-config": ("audio", (), {"preprocessor_config.json": '{"sampling_rate": 16000,'},
                                       r"/preprocessor_config\.json is not valid JSON"),
    "audio-no-sampling-rate": ("audio", (), {"preprocessor_config.json": json.dumps({"do_normalize": True})},
                               r"/preprocessor_config\.json states no sampling_rate"),
    "text-dense-module": ("text", (), {"modules.json": minilm_modules("Dense")},
                          r"/modules\.json lists a sentence_transformers\.models\.Dense module"),
    "text-lasttoken-pooling": ("text", (), {"1_Pooling/config.json": minilm_pooling(
        pooling_mode_mean_tokens=False, pooling_mode_lasttoken=True)},
                               r"/1_Pooling/config\.json asks for pooling \['pooling_mode_lasttoken'\]"),
    "text-unknown-model-type": ("text", (), {"config.json": json.dumps({"model_type": "no-such-model"})},
                                r"/config\.json: model_type 'no-such-model' is not one transformers .* knows"),
}


def config_with(encoder_weights, modality: str, weights: str, **encoder):
    """The test embedding config (s3:// placeholder image / audio weights, packaged text model) with one
    modality's weights replaced."""
    return embed_config(encoder_weights, "check-weights", **{modality: {"encoder": {"weights": weights, **encoder}}})


def test_valid_folders_pass(encoder_weights, seeded_folders, storage, tmp_path):
    """The packaged text model, the placeholder image / audio prefixes in S3 and the same folders on local
    disk; a local folder absent from the driver (it need only exist on the workers) is not checked."""
    check_weights(embed_config(encoder_weights, "check-weights"), storage)
    local = embed_config(encoder_weights, "check-weights", image={"encoder": {"weights": str(seeded_folders["image"])}},
                         audio={"encoder": {"weights": str(seeded_folders["audio"])}},
                         text={"encoder": {"weights": str(seeded_folders["text"])}})
    check_weights(local, storage)
    check_weights(config_with(encoder_weights, "image", str(tmp_path / "only-on-the-workers")), storage)


def test_a_pooling_chosen_in_the_config_is_not_refused(encoder_weights, seeded_folders, storage, tmp_path):
    """The text encoder takes a checkpoint's unsupported pooling when the config chooses one knowingly:
    so does the check (no refusal the encoder would not make)."""
    lasttoken = variant(seeded_folders["text"], tmp_path / "lasttoken", write={"1_Pooling/config.json": minilm_pooling(
        pooling_mode_mean_tokens=False, pooling_mode_lasttoken=True)})
    check_weights(config_with(encoder_weights, "text", str(lasttoken), pooling="mean"), storage)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_local_folder_the_encoder_cannot_use_is_refused_naming_key_and_file(case, encoder_weights, seeded_folders,
                                                                             storage, tmp_path):
    modality, drop, write, says = BROKEN[case]
    folder = variant(seeded_folders[modality], tmp_path / case, drop, write)
    cfg = config_with(encoder_weights, modality, str(folder))
    with pytest.raises(EmbeddingInputError, match=rf"^{modality}\.encoder\.weights: {re.escape(str(folder))}{says}"):
        check_weights(cfg, storage)
    # the job's Ray side refuses the folder too: the encoder actor as it loads, or a preprocessing task's setup
    # (RuntimeError: the squeezenet spec fails on the resnet state_dict before its layers are looked at)
    encoder_cfg = getattr(cfg, modality).encoder.model_copy(update={"device": "cpu"})
    with pytest.raises((FileNotFoundError, ValueError, RuntimeError)):
        ENCODERS[modality](encoder_cfg, storage).preprocessor.setup()


@pytest.mark.parametrize("case", ["image-no-preprocessor-config", "audio-text-model"])
def test_an_s3_prefix_the_encoder_cannot_use_is_refused_naming_key_and_file(case, encoder_weights, seeded_folders,
                                                                           storage, bucket_uri, tmp_path):
    modality, drop, write, says = BROKEN[case]
    prefix = join_uri(bucket_uri, case)
    upload_folder(variant(seeded_folders[modality], tmp_path / case, drop, write), prefix, storage)
    with pytest.raises(EmbeddingInputError, match=rf"^{modality}\.encoder\.weights: {re.escape(prefix)}{says}"):
        check_weights(config_with(encoder_weights, modality, prefix), storage)
