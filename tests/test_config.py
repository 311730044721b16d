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


class Named(TesseraConfig):
    run_id: str = "demo"
    uri: str = "s3://b/x"
    inner: Inner = Inner()
    ks: list[int] = [10]


def test_env_values_are_their_text_converted_to_the_key_type(tmp_path):
    """Scalars are the variable's text (stripped), converted by the key's type; lists, mappings, null and
    quoted strings are YAML. Before, TESSERA__RUN_ID=20241205 failed ("Input should be a valid string"),
    YAML 1.1 read 0123 as 83 and 1.10 as 1.1, and a URI was cut at ' #' with no error."""
    cfg = load_config(Named, None, environ={"TESSERA__RUN_ID": "20241205", "TESSERA__URI": "s3://b/x #1",
                                             "TESSERA__INNER__BATCH_SIZE": "64", "TESSERA__KS": "[5, 20]"})
    assert cfg.run_id == "20241205" and cfg.uri == "s3://b/x #1" and cfg.inner.batch_size == 64 and cfg.ks == [5, 20]
    for text in ("2024-12-05", "0123", "1.10", "0x1F", "1_000", "yes"):
        assert load_config(Named, None, environ={"TESSERA__RUN_ID": text}).run_id == text
    assert load_config(Named, None, environ={"TESSERA__RUN_ID": '"007"'}).run_id == "007"
    assert load_config(Named, None, environ={"TESSERA__URI": " s3://b/x \r"}).uri == "s3://b/x"  # a CRLF .env
    assert load_config(Outer, None, environ={"TESSERA__RATIO": "1e-3"}).ratio == 0.001
    with pytest.raises(ConfigError, match=r"key 'run_id' in file .*valid string"):  # a file's bare number: quote it
        load_config(Named, write(tmp_path, "run_id: 1.10\n"), environ={})


def test_an_error_beneath_an_env_override_names_the_variable_not_the_file(tmp_path):
    """An override of a key the model lacks, deeper than the unknown key (TESSERA__REAL_MEDIA__ENABLED in a
    job without real_media), was blamed on the file, which has no such key."""
    p = write(tmp_path, "inner:\n  batch_size: 32\n")
    with pytest.raises(ConfigError) as err:
        load_config(Named, p, environ={"TESSERA__REAL_MEDIA__ENABLED": "false"})
    assert "unknown key 'real_media' in environment variable TESSERA__REAL_MEDIA__ENABLED" in str(err.value)
    from pydantic import model_validator

    class Pair(TesseraConfig):
        lo: int = 0
        hi: int = 1

        @model_validator(mode="after")
        def ordered(self):
            if self.lo >= self.hi:
                raise ValueError("lo must be below hi")
            return self

    class Holder(TesseraConfig):
        pair: Pair = Pair()

    p = write(tmp_path, "pair:\n  lo: 5\n")  # the section fails on the file's value and an override's
    with pytest.raises(ConfigError) as err:
        load_config(Holder, p, environ={"TESSERA__PAIR__HI": "3"})
    assert f"key 'pair' in file {p} (with environment variable TESSERA__PAIR__HI)" in str(err.value)

    class Top(TesseraConfig):
        lo: int = 0
        hi: int = 1
        pair: Pair = Pair()

        @model_validator(mode="after")
        def ordered(self):
            if self.lo >= self.hi:
                raise ValueError("lo must be below hi")
            return self

    p = write(tmp_path, "lo: 5\n")  # an error of the whole config: an unrelated override is not named
    with pytest.raises(ConfigError) as err:
        load_config(Top, p, environ={"TESSERA__PAIR__LO": "0"})
    assert f"key '<root>' in file {p}:" in str(err.value) and "TESSERA__PAIR__LO" not in str(err.value)


def test_an_empty_training_version_is_refused():
    """An empty version (an unset variable in TESSERA__VERSION=$V) named the models root as the bundle, and
    --overwrite then deleted every version's checkpoints under checkpoint_uri."""
    from tessera.train.config import TrainConfig

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "train.yaml").read_text())
    for bad in ("", "a/b", ".."):
        with pytest.raises(ConfigError, match=r"key 'version' in environment variable TESSERA__VERSION"):
            parse_config(TrainConfig, base, environ={"TESSERA__VERSION": bad})
    assert parse_config(TrainConfig, base, environ={"TESSERA__VERSION": "2"}).version == "2"


def test_a_variant_listed_twice_is_refused():
    """It was trained twice, for the same result."""
    from tessera.train.config import TrainConfig

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "train.yaml").read_text())
    with pytest.raises(ConfigError, match=r"variants lists \['text'\] more than once"):
        parse_config(TrainConfig, {**base, "variants": ["fused", "text", "image", "text"]})
