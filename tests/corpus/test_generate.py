"""The corpus job end to end on the real S3 store and a real Ray: counts, bad items, truth kept apart."""

import io
import wave

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tessera.corpus import CorpusConfig, generate_corpus
from tessera.corpus.catalog import BAD_KINDS
from tessera.storage import join_uri

BAD = {k: 0.04 for k in BAD_KINDS}


@pytest.fixture(scope="module")
def corpus(ray_session, storage, shared_data):
    storage.ensure_bucket("s3://tessera-test")
    import uuid

    root = f"s3://tessera-test/corpus-{uuid.uuid4().hex[:8]}"
    cfg = CorpusConfig(root=root, num_items=240, num_users=60, items_per_part=80, users_per_part=25,
                       image_size=48, audio_seconds=0.25, bad=BAD, max_parts_in_flight=2,
                       real_media={"enabled": True, "data_dir": str(shared_data), "share": 0.1})
    manifest = generate_corpus(cfg)
    return cfg, manifest


def _read(storage, uri_prefix):
    files = storage.list_files(uri_prefix, ".parquet")
    fs, _ = storage.filesystem(files[0])
    return pa.concat_tables([pq.read_table(storage.filesystem(f)[1], filesystem=fs) for f in files])


def test_counts_add_up(corpus, storage):
    cfg, manifest = corpus
    items = _read(storage, join_uri(cfg.root, "corpus", "items"))
    inter = _read(storage, join_uri(cfg.root, "corpus", "interactions"))
    c = manifest["counts"]
    assert items.num_rows == c["items"] == 240
    assert len(set(items.column("item_id").to_pylist())) == 240
    assert inter.num_rows == c["interactions"] and c["users"] == 60
    assert set(inter.column("item_id").to_pylist()) <= set(items.column("item_id").to_pylist())
    assert c["with_image"] == items.column("image_uri").drop_null().length()
    assert sum(c["bad"].values()) > 0 and c["real_media"] > 0
    assert storage.read_json(join_uri(cfg.root, "corpus", "_MANIFEST.json"))["counts"] == c


def test_items_table_holds_no_ground_truth(corpus, storage):
    cfg, _ = corpus
    items = _read(storage, join_uri(cfg.root, "corpus", "items"))
    assert items.column_names == ["item_id", "text", "image_uri", "audio_uri", "price"]
    truth = _read(storage, join_uri(cfg.root, "truth", "items"))
    assert {"category", "colour", "pitch", "bad_kind"} <= set(truth.column_names)


def test_bad_items_are_really_bad(corpus, storage):
    cfg, _ = corpus
    table = _read(storage, join_uri(cfg.root, "corpus", "items"))
    # text may hold invalid UTF-8 (on purpose): read it as bytes
    text = table.column("text").cast(pa.binary()).to_pylist()
    rows = {iid: (t, img, aud) for iid, t, img, aud in zip(table.column("item_id").to_pylist(), text,
                                                          table.column("image_uri").to_pylist(),
                                                          table.column("audio_uri").to_pylist(), strict=True)}
    truth = _read(storage, join_uri(cfg.root, "truth", "items")).to_pylist()
    seen = set()
    for t in truth:
        kind = t["bad_kind"]
        if not kind:
            continue
        seen.add(kind)
        txt, img, aud = rows[t["item_id"]]
        if kind == "corrupt_image":
            with pytest.raises(OSError):
                Image.open(io.BytesIO(storage.read_bytes(img))).load()
        elif kind == "truncated_audio":
            data = storage.read_bytes(aud)
            with wave.open(io.BytesIO(data)) as w:
                assert w.getnframes() * 2 > len(data) - 44
        elif kind == "empty_text":
            assert txt == b""
        elif kind == "non_utf8_text":
            with pytest.raises(UnicodeDecodeError):
                txt.decode("utf-8")
        elif kind == "missing_object":
            with pytest.raises(FileNotFoundError):
                storage.read_bytes(img)
        elif kind == "oversized_image":
            assert Image.open(io.BytesIO(storage.read_bytes(img))).size[0] >= 8000
        elif kind == "wrong_format":
            assert storage.read_bytes(img)[:4] == b"RIFF"
    assert seen == set(BAD_KINDS)


def test_good_media_decode(corpus, storage):
    cfg, _ = corpus
    truth = [t for t in _read(storage, join_uri(cfg.root, "truth", "items")).to_pylist()
             if not t["bad_kind"] and t["has_image"] and t["has_audio"] and not t["real_media"]][:5]
    for t in truth:
        img = Image.open(io.BytesIO(storage.read_bytes(join_uri(cfg.root, "corpus/media/images",
                                                                f"{t['item_id']}.jpg"))))
        assert img.size == (48, 48)
        with wave.open(io.BytesIO(storage.read_bytes(join_uri(cfg.root, "corpus/media/audio",
                                                              f"{t['item_id']}.wav")))) as w:
            assert w.getframerate() == 16000 and w.getnframes() == 4000
            assert np.abs(np.frombuffer(w.readframes(4000), "<i2")).max() > 1000


def test_rerun_reuses_and_refuses_other_settings(corpus):
    cfg, manifest = corpus
    again = generate_corpus(cfg)
    assert again.get("reused") and again["counts"] == manifest["counts"]
    with pytest.raises(FileExistsError, match="other settings"):
        generate_corpus(cfg.model_copy(update={"seed": cfg.seed + 1}))


def test_the_cli_refuses_another_corpus_at_the_same_root_with_exit_2(corpus, tmp_path, capsys):
    import json

    from jobs import make_corpus

    cfg, _ = corpus
    path = tmp_path / "corpus.yaml"
    path.write_text(json.dumps(cfg.model_copy(update={"seed": cfg.seed + 1}).model_dump(mode="json",
                                                                                        exclude={"storage"})))
    assert make_corpus.main(["--config", str(path)]) == 2  # was a traceback and exit 1
    assert f"error ({path}): " in capsys.readouterr().err
