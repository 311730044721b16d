from pathlib import Path

import pytest
import yaml

from tessera.config import ConfigError, TesseraConfig, load_config, parse_config
from tessera.corpus import CorpusConfig


class Inner(TesseraConfig):
    batch_size: int = 8
    name: str = "x"


class Outer(TesseraConfig):
    inner: Inner = Inner()
    ratio: float = 0.5


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_loads_yaml_and_defaults(tmp_path):
    cfg = load_config(Outer, write(tmp_path, "inner:\n  batch_size: 32\n"), environ={})
    assert cfg.inner.batch_size == 32 and cfg.inner.name == "x" and cfg.ratio == 0.5


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "inner:\n  batch_sise: 32\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, p, environ={})
    assert "inner.batch_sise" in str(err.value) and str(p) in str(err.value)


def test_wrong_type_names_key_and_file(tmp_path):
    p = write(tmp_path, "ratio: lots\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, p, environ={})
    assert "'ratio'" in str(err.value) and str(p) in str(err.value) and "lots" in str(err.value)


def test_env_override_is_parsed_and_applied(tmp_path):
    p = write(tmp_path, "inner:\n  batch_size: 32\n")
    cfg = load_config(Outer, p, environ={"TESSERA__INNER__BATCH_SIZE": "64", "TESSERA__RATIO": "0.25"})
    assert cfg.inner.batch_size == 64 and cfg.ratio == 0.25


def test_bad_env_override_names_the_variable(tmp_path):
    p = write(tmp_path, "{}\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, p, environ={"TESSERA__INNER__BATCH_SIZE": "many"})
    assert "TESSERA__INNER__BATCH_SIZE" in str(err.value)


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(Outer, tmp_path / "nope.yaml", environ={})
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, write(tmp_path, "- a\n- b\n"), environ={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, write(tmp_path, "a: [1, 2\n"), environ={})


def test_repo_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(CorpusConfig, root / "configs" / "corpus.yaml", environ={})
    assert cfg.num_items == 1000


def test_corpus_shares_validated(tmp_path):
    p = write(tmp_path, "missing:\n  one_modality: 0.9\n")
    with pytest.raises(ConfigError, match="shares"):
        load_config(CorpusConfig, p, environ={})


def test_a_bad_command_line_override_names_the_flag(capsys):
    """The jobs' flags go through the same validation as the file; the error names the flag and its key."""
    from jobs import build_index, embed

    assert build_index.main(["--shards", "0"]) == 2
    assert "--shards 0 (config key 'num_shards'): Input should be greater than or equal to 1" in capsys.readouterr().err
    assert embed.main(["--max-error-rate", "1.5"]) == 2
    assert "--max-error-rate 1.5 (config key 'max_error_rate')" in capsys.readouterr().err


def test_training_cut_offs_are_positive():
    from tessera.train.config import TrainConfig

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "train.yaml").read_text())
    with pytest.raises(ConfigError, match=r"key 'ks.0'.*greater than or equal to 1"):
        parse_config(TrainConfig, {**base, "ks": [0, 10]})


def test_keeping_the_best_epoch_needs_a_validation_split():
    from tessera.train.config import TrainConfig

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "train.yaml").read_text())
    with pytest.raises(ConfigError, match=r"keep_epoch 'best' chooses by the validation targets: it needs validation"):
        parse_config(TrainConfig, {**base, "validation": 0, "keep_epoch": "best"})
    assert parse_config(TrainConfig, {**base, "validation": 0, "keep_epoch": "last"}).keep_epoch == "last"
