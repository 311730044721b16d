"""Embedding a finished run's failed items again into a new run (``retry_failed_from``), on the real S3
store and a real Ray, with real JPEG bytes: an object uploaded after the first run is embedded by the
retry, a still-broken one fails again, and every other row is the first run's, byte for byte."""

import json
import uuid

import numpy as np
import pyarrow as pa
import pytest

from jobs import embed as embed_job
from tessera.embed.output import committed_parts, list_parts
from tessera.embed.pipeline import EmbeddingInputError, run_embedding, run_identity
from tessera.embed.retry import SEEDED, prepare_retry, retried_rows
from tessera.lease import RunLease
from tessera.storage import join_uri
from tests.conftest import embed_config


def test_retried_rows_match_the_kind_before_the_colon():
    table = pa.table({"image_error": ["missing: s3://b/x.jpg", None, "corrupt: bad: header", "empty", None],
                      "text_error": [None, "not_utf8: byte 3", None, None, "missing"]})
    assert retried_rows(table, ["image", "text"], ["missing"]).tolist() == [True, False, False, False, True]
    assert retried_rows(table, ["image", "text"], ["corrupt", "empty"]).tolist() == [False, False, True, True, False]
    assert retried_rows(table, ["image"], ["not_utf8"]).tolist() == [False] * 5  # only the modalities named
    nulls = pa.table({"image_error": pa.nulls(3, pa.null())})  # a column Parquet wrote without a value
    assert retried_rows(nulls, ["image"], ["missing"]).tolist() == [False] * 3


def _rows(storage, parts) -> dict[str, dict]:
    return {r["item_id"]: r for uri in parts for r in storage.read_parquet(uri).to_pylist()}


@pytest.fixture(scope="module")
def first_run(storage, encoder_weights, shared_data, ray_session):
    """Twelve items with text and a real photo each: one photo's object absent, one cut short."""
    storage.ensure_bucket("s3://tessera-test")
    root = f"s3://tessera-test/retry-{uuid.uuid4().hex[:8]}"
    photos = sorted(shared_data.glob("grocery/dataset/iconic-images-and-descriptions/*/*/*_Iconic.jpg"))[:10]
    assert len(photos) == 10
    ids, texts, uris = [], [], []
    for n, photo in enumerate(photos):
        uri = join_uri(root, "media", f"{n}.jpg")
        storage.write_bytes(uri, photo.read_bytes())
        ids.append(f"item-{n:02d}")
        texts.append(f"{photo.stem.replace('_Iconic', '').replace('-', ' ')}, fresh from the market")
        uris.append(uri)
    late, broken = join_uri(root, "media", "late.jpg"), join_uri(root, "media", "broken.jpg")
    storage.write_bytes(broken, photos[1].read_bytes()[:200] + b"\x00" * 64)  # cut short: a JPEG header, then zeros
    ids += ["item-late", "item-broken"]
    texts += ["uploaded after the first run", "a photo that stays broken"]
    uris += [late, broken]
    storage.write_parquet(join_uri(root, "items", "part-00000.parquet"),
                          pa.table({"item_id": ids, "text": texts, "image_uri": uris}))

    def config(run_id, **overrides):
        return embed_config(encoder_weights, run_id, items_uri=join_uri(root, "items"),
                            output_uri=join_uri(root, "embeddings"), audio={"enabled": False},
                            read_batch_rows=4, write_batch_size=4, **overrides)

    manifest = run_embedding(config("first"))
    return {"root": root, "config": config, "manifest": manifest, "late": late, "photo": photos[0]}


def test_a_retry_embeds_the_failed_items_and_copies_the_rest(first_run, storage):
    first = first_run["manifest"]
    assert first["counts"]["image"]["errors"] == {"missing": 1, "truncated": 1}, first["counts"]
    first_uri = first["output"]["uri"]
    first_manifest_bytes = storage.read_bytes(join_uri(first_uri, "_MANIFEST.json"))
    first_parts = committed_parts(storage, first_uri, first)
    before = _rows(storage, first_parts)
    assert before["item-late"]["image_error"].startswith("missing")
    storage.write_bytes(first_run["late"], first_run["photo"].read_bytes())  # uploaded since: the same photo as item-00

    retry = run_embedding(first_run["config"]("second", retry_failed_from="first"))

    seeded = retry["retried_from"]
    assert seeded["run"] == first_uri and seeded["items_retried"] == 2 and seeded["items_copied"] == 10
    assert seeded["retried_by_kind"] == {"image.missing": 1, "image.truncated": 1}
    assert seeded["parts_copied"] + seeded["parts_rewritten"] + seeded["parts_left_out"] == len(first_parts)
    assert len(first_parts) >= 3 and seeded["parts_copied"] >= 1  # two failed items, parts of <= 4: one has neither
    assert retry["timings"]["items_written_this_attempt"] == 2
    image = retry["counts"]["image"]
    assert image["ok"] == first["counts"]["image"]["ok"] + 1 and image["errors"] == {"truncated": 1}, image
    assert retry["counts"]["text"] == first["counts"]["text"]

    after = _rows(storage, committed_parts(storage, retry["output"]["uri"], retry))
    assert sorted(after) == sorted(before)  # every item once
    for item, row in after.items():
        if item not in ("item-late", "item-broken"):
            assert row == before[item], item  # copied, not encoded again: the same values exactly
    assert after["item-broken"]["image"] is None and after["item-broken"]["image_error"].startswith("truncated")
    # the uploaded photo is item-00's: embedded now, to item-00's vector (same bytes, same weights)
    late, same = np.asarray(after["item-late"]["image"]), np.asarray(before["item-00"]["image"])
    assert after["item-late"]["image_error"] is None and float(late @ same) > 0.999
    common = {uri.rsplit("/", 1)[-1] for uri in first_parts} & {uri.rsplit("/", 1)[-1] for uri in
                                                               list_parts(storage, retry["output"]["uri"])}
    assert len(common) == seeded["parts_copied"]
    for name in common:  # a part without failed items is the same file
        copied = storage.read_bytes(join_uri(retry["output"]["uri"], name))
        assert storage.read_bytes(join_uri(first_uri, name)) == copied

    # the first run is as it was, and the retry, once finished, is kept as it is
    assert storage.read_bytes(join_uri(first_uri, "_MANIFEST.json")) == first_manifest_bytes
    assert list_parts(storage, first_uri) == first_parts
    assert run_embedding(first_run["config"]("second", retry_failed_from="first")).get("reused")
    with pytest.raises(EmbeddingInputError, match=r"is a finished run, a retry of .*first \(kinds "):
        run_embedding(first_run["config"]("second", retry_failed_from="first", retry_kinds=["missing"]))
    with pytest.raises(EmbeddingInputError, match=r"is a finished run, no retry"):  # the first run is none
        run_embedding(first_run["config"]("first", retry_failed_from="second"))


def test_a_retry_killed_during_its_copy_resumes_as_it_was_begun(first_run, storage):
    """The copy made by the job's own code, then cut back to the state a kill during it leaves (its intent
    recorded, one part copied). Resumed under other settings it is refused; resumed without the flags it
    goes on as begun and ends as an uninterrupted retry does."""
    first = first_run["manifest"]
    cfg = first_run["config"]("resumed", retry_failed_from="first", retry_kinds=["missing"])
    resumed_uri = join_uri(cfg.output_uri, "resumed")
    files = storage.list_files(cfg.items_uri, ".parquet")
    identity = run_identity(cfg, files, storage.parquet_rows(files))
    with RunLease(storage, join_uri(resumed_uri, "_LEASE.json"), 60.0) as lease:
        seeded = prepare_retry(storage, resumed_uri, "first", ["missing"], cfg.output_uri, identity,
                               list(cfg.modalities()), lease, lambda found: None)
    assert seeded["complete"] and seeded["items_retried"] == 1
    marker = storage.read_json(join_uri(resumed_uri, SEEDED))
    storage.write_json(join_uri(resumed_uri, SEEDED), {k: marker[k] for k in ("run", "kinds", "source_parts")}
                       | {"complete": False})
    for uri in list_parts(storage, resumed_uri)[1:]:
        storage.delete(uri)

    with pytest.raises(EmbeddingInputError, match=r"begun as a retry of .*first \(kinds missing\)"):
        run_embedding(first_run["config"]("resumed", retry_failed_from="first", retry_kinds=["truncated"]))
    with pytest.raises(EmbeddingInputError, match=r"started with other settings \(encoders.text.max_length"):
        run_embedding(first_run["config"]("resumed", text={"encoder": {"max_length": 64}}))  # pinned before the copy
    resumed = run_embedding(first_run["config"]("resumed"))

    assert resumed["retried_from"]["kinds"] == ["missing"] and resumed["retried_from"]["items_retried"] == 1
    after = _rows(storage, committed_parts(storage, resumed_uri, resumed))
    before = _rows(storage, committed_parts(storage, first["output"]["uri"], first))
    assert sorted(after) == sorted(before)
    assert {item for item in after if after[item] != before[item]} == {"item-late"}  # nothing else embedded again
    assert after["item-late"]["image"] is not None and after["item-broken"] == before["item-broken"]
    assert resumed["timings"]["items_written_this_attempt"] == 1


def test_a_retry_is_refused_from_an_absent_run_other_settings_or_into_another_run(first_run, storage, tmp_path,
                                                                                    capsys):
    config = first_run["config"]
    runs = join_uri(first_run["root"], "embeddings")
    with pytest.raises(EmbeddingInputError, match="has no manifest"):
        run_embedding(config("from-nothing", retry_failed_from="absent"))
    with pytest.raises(EmbeddingInputError, match=r"other settings \(encoders.text.max_length differ"):
        run_embedding(config("longer", retry_failed_from="first", text={"encoder": {"max_length": 64}}))
    for refused in ("from-nothing", "longer"):  # refused before anything is written
        names = [uri.rsplit("/", 1)[1] for uri in storage.list_files(join_uri(runs, refused))]
        assert not [n for n in names if n.startswith("part-") or n in (SEEDED, "_RUN.json")], (refused, names)

    # a run id that holds parts of its own (here: of an attempt that was no retry) is not a retry's
    first_parts = committed_parts(storage, first_run["manifest"]["output"]["uri"], first_run["manifest"])
    storage.write_bytes(join_uri(runs, "stray", first_parts[0].rsplit("/", 1)[1]), storage.read_bytes(first_parts[0]))
    with pytest.raises(EmbeddingInputError, match="already holds parts"):
        run_embedding(config("stray", retry_failed_from="first"))
    # a source embedded again since a copy from it began, and one missing a part its manifest lists
    first_uri = first_run["manifest"]["output"]["uri"]
    twin = join_uri(runs, "twin")
    for uri in storage.list_files(first_uri):
        storage.write_bytes(join_uri(twin, uri.rsplit("/", 1)[1]), storage.read_bytes(uri))
    cfg = config("from-twin", retry_failed_from="twin")
    files = storage.list_files(cfg.items_uri, ".parquet")
    with RunLease(storage, join_uri(runs, "from-twin", "_LEASE.json"), 60.0) as lease:
        prepare_retry(storage, join_uri(runs, "from-twin"), "twin", cfg.retry_kinds, cfg.output_uri,
                      run_identity(cfg, files, storage.parquet_rows(files)), list(cfg.modalities()), lease,
                      lambda found: None)
    marker = storage.read_json(join_uri(runs, "from-twin", SEEDED))
    storage.write_json(join_uri(runs, "from-twin", SEEDED), marker | {"complete": False})  # as if killed
    manifest = storage.read_json(join_uri(twin, "_MANIFEST.json"))
    gone, *kept = manifest["output"]["files"]
    storage.delete(join_uri(twin, gone))
    storage.write_json(join_uri(twin, "_MANIFEST.json"), manifest | {"output": manifest["output"] | {"files": kept}})
    with pytest.raises(EmbeddingInputError, match="has other parts than when the copy"):
        run_embedding(cfg)
    storage.delete(join_uri(twin, kept[0]))  # its manifest still lists it
    with pytest.raises(EmbeddingInputError, match=r"lacks 1 of the parts its manifest lists"):
        run_embedding(config("from-gappy", retry_failed_from="twin"))

    # kinds to retry with no run to retry them from
    with pytest.raises(EmbeddingInputError, match=r"retry_kinds is set \(missing\) but retry_failed_from is not"):
        run_embedding(config("first", retry_kinds=["missing"]))

    path = tmp_path / "embed.yaml"
    path.write_text(json.dumps(config("first").model_dump(mode="json")))
    assert embed_job.main(["--config", str(path), "--retry-failed-from", "first"]) == 2
    assert "retry_failed_from is the run itself" in capsys.readouterr().err
    assert embed_job.main(["--config", str(path), "--run-id", "x", "--retry-failed-from", "first",
                           "--retry-kinds", "missing,lost"]) == 2
    assert "--retry-kinds" in capsys.readouterr().err
    assert embed_job.main(["--config", str(path), "--run-id", "x", "--retry-failed-from", "first",
                           "--retry-kinds", ""]) == 2
    assert "--retry-kinds" in capsys.readouterr().err
