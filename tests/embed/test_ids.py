"""Item ids as keyed 64-bit hashes (tessera.embed.ids) and the embedding job's id checks built on them:
the duplicate check of the input, the tally of the output and the resume filter, on the real S3 store
and a real Ray. Collisions are forced by cutting the hash to 3 bits: answers must stay exact."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tessera.embed import ids as ids_module
from tessera.embed import output as output_module
from tessera.embed import pipeline as pipeline_module
from tessera.embed.ids import colliding, hash_ids, ids_with_hashes, is_member, map_files, new_key
from tessera.embed.output import (
    committed_parts,
    done_items,
    list_parts,
    part_name,
    superseded_copies,
    tally,
    vector_column,
    write_part,
)
from tessera.embed.pipeline import EmbeddingInputError, check_item_ids
from tessera.storage import join_uri


@pytest.fixture
def three_bit_hash(monkeypatch):
    """Every module's ``hash_ids`` cut to 3 bits: 8 values, so any 9 ids collide."""
    real = ids_module.hash_ids

    def weak(ids, key):
        return real(ids, key) & np.uint64(7)

    for module in (ids_module, output_module, pipeline_module):
        monkeypatch.setattr(module, "hash_ids", weak)


def test_hashes_are_keyed_deterministic_and_take_arrow_or_lists():
    items = [f"item-{i}" for i in range(1000)] + ["", "é", "x" * 500]
    key = new_key()
    h = hash_ids(pa.array(items), key)
    assert h.dtype == np.uint64 and len(h) == len(items) and len(np.unique(h)) == len(items)
    assert np.array_equal(h, hash_ids(items, key))
    assert np.array_equal(h, hash_ids(pa.chunked_array([items[:10], items[10:]]), key))
    assert np.count_nonzero(h == hash_ids(items, new_key())) < 3  # another key, other hashes
    assert len(hash_ids([], key)) == 0 and len(hash_ids(pa.array([], pa.string()), key)) == 0


def test_membership_matches_a_python_set():
    written = {f"w{i}" for i in np.random.default_rng(0).choice(10_000, 3_000, replace=False)}
    asked = [f"w{i}" for i in range(10_000)]
    key = new_key()
    member = is_member(np.unique(hash_ids(sorted(written), key)), hash_ids(asked, key))
    assert member.tolist() == [a in written for a in asked]
    assert not is_member(np.empty(0, np.uint64), hash_ids(asked, key)).any()


def test_colliding_counts_distinct_values_and_names_the_repeated_ones():
    count, repeated = colliding([np.array([5, 1, 9], np.uint64), np.array([9, 2, 5, 5], np.uint64)])
    assert count == 4 and repeated.tolist() == [5, 9]
    assert colliding([np.array([3], np.uint64)])[1].tolist() == []
    assert colliding([])[0] == 0
    key = new_key()
    wanted = np.unique(hash_ids(["a", "c"], key))
    assert ids_with_hashes(pa.array(["a", "b", "a", "c"]), key, wanted) == ["a", "a", "c"]


def test_map_files_on_ray_keeps_the_order_across_tasks(ray_session):
    uris = [f"u{i}" for i in range(37)]
    expected = [f"u{i}!" for i in range(37)]
    assert map_files(str.__add__, uris, "!", per_task=5, use_ray=True) == expected
    assert map_files(str.__add__, uris, "!", use_ray=False) == expected


def _write_items(storage, root, files):
    uris = []
    for i, ids in enumerate(files):
        uri = join_uri(root, f"items-{i}.parquet")
        fs, path = storage.filesystem(uri)
        pq.write_table(pa.table({"item_id": pa.array(ids, pa.string())}), path, filesystem=fs)
        uris.append(uri)
    return uris


@pytest.mark.parametrize("use_ray", [False, True])
def test_input_check_tells_ids_sharing_a_hash_from_one_id_in_two_files(storage, bucket_uri, three_bit_hash, use_ray):
    # under Ray the tasks hash with the real function (the patch lives in this process): both must agree
    files = _write_items(storage, bucket_uri, [[f"a{i}" for i in range(20)], [f"b{i}" for i in range(20)]])
    check_item_ids(storage, files, use_ray=use_ray)  # 40 distinct ids over 8 hash values: no duplicate
    files += _write_items(storage, join_uri(bucket_uri, "more"), [["c1", "a7", "c2"]])
    with pytest.raises(EmbeddingInputError, match=r"item_id 'a7' is in both .*items-0.parquet and .*items-0.parquet"):
        check_item_ids(storage, files, use_ray=use_ray)


@pytest.mark.parametrize("use_ray", [False, True])
def test_input_check_refuses_a_file_without_a_source_column_or_with_non_string_ids(storage, bucket_uri, use_ray):
    """Ray Data's read drops a column the file lacks without a word (a stage then failed the job on a
    KeyError), and an int64 item_id failed the first stage: both are refused up front, naming the file."""
    root = join_uri(bucket_uri, f"schema-{use_ray}")
    good = join_uri(root, "good.parquet")
    storage.write_parquet(good, pa.table({"item_id": ["a", "b"], "text": ["x", "y"], "audio_uri": [None, "s3://b/k"]}))
    check_item_ids(storage, [good], use_ray=use_ray, columns=["text", "audio_uri"])
    no_audio = join_uri(root, "no-audio.parquet")
    storage.write_parquet(no_audio, pa.table({"item_id": ["c"], "text": ["z"]}))
    with pytest.raises(EmbeddingInputError, match=r"no-audio.parquet: no audio_uri column \(it has item_id, text\)"):
        check_item_ids(storage, [good, no_audio], use_ray=use_ray, columns=["text", "audio_uri"])
    categorical = join_uri(root, "categorical.parquet")  # a pandas categorical: dictionary<string>, accepted
    storage.write_parquet(categorical, pa.table({"item_id": pa.array(["d", "e"]).dictionary_encode(),
                                                 "text": ["r", "s"], "audio_uri": [None, None]}))
    check_item_ids(storage, [good, categorical], use_ray=use_ray, columns=["text", "audio_uri"])
    ints = join_uri(root, "ints.parquet")
    storage.write_parquet(ints, pa.table({"item_id": pa.array([1, 2], pa.int64()), "text": ["p", "q"]}))
    with pytest.raises(EmbeddingInputError, match=r"ints.parquet: item_id must be a string column, not int64"):
        check_item_ids(storage, [good, ints], use_ray=use_ray, columns=["text"])
    # a source column of another type failed its cast in a read task once the run had started, naming neither
    int_uris = join_uri(root, "int-uris.parquet")
    storage.write_parquet(int_uris, pa.table({"item_id": ["f"], "text": ["t"], "audio_uri": pa.array([7], pa.int64())}))
    with pytest.raises(EmbeddingInputError, match=r"int-uris.parquet: audio_uri must be a string \(or binary\) "
                                                  r"column, not int64"):
        check_item_ids(storage, [good, int_uris], use_ray=use_ray, columns=["text", "audio_uri"])
    lists = join_uri(root, "list-text.parquet")
    storage.write_parquet(lists, pa.table({"item_id": ["g"], "text": [["two", "words"]]}))
    with pytest.raises(EmbeddingInputError, match=r"list-text.parquet: text must be a string"):
        check_item_ids(storage, [good, lists], use_ray=use_ray, columns=["text"])


def _write_run(storage, run_uri):
    """Four parts: 40 distinct ids, the fourth repeating three of the first's (43 rows). Text vectors
    absent for ids 0, 5, 10, ..., 35, of which 0, 10, 20, 30 failed (error recorded) and 5, 15, 25, 35
    are missing. The fourth records other text weights (``sha256:bb``) than the rest (``sha256:aa``)."""
    groups = [[f"i{j}" for j in range(k, k + 10)] for k in (0, 10, 20, 30)]
    groups[3] += ["i1", "i2", "i3"]
    for n, ids in enumerate(groups):
        vectors = [None if int(i[1:]) % 5 == 0 else np.ones(4, np.float32) / 2 for i in ids]
        errors = ["corrupt: bad bytes" if int(i[1:]) % 10 == 0 else None for i in ids]
        write_part(storage, run_uri, pa.table({"item_id": pa.array(ids, pa.string()), "text": vector_column(vectors, 4),
                                               "text_error": pa.array(errors, pa.string())}),
                   weights={"text": ["sha256:bb" if n == 3 else "sha256:aa"]})
    return groups


@pytest.mark.parametrize("weak", [False, True])
def test_tally_counts_exactly_even_when_ids_share_hashes(storage, bucket_uri, request, weak):
    if weak:
        request.getfixturevalue("three_bit_hash")
    run_uri = join_uri(bucket_uri, "run")
    groups = _write_run(storage, run_uri)
    rows = sum(len(g) for g in groups)
    for use_ray in ([False] if weak else [False, True]):  # Ray tasks would hash with the real function
        t = tally(storage, run_uri, ["text"], use_ray=use_ray)
        assert (t.parts, t.rows, t.distinct_ids, t.duplicates) == (4, rows, 40, 3)
        assert sorted(t.weights["text"]) == ["sha256:aa", "sha256:bb"]
        assert t.weights["text"]["sha256:bb"] == join_uri(run_uri, part_name(groups[3]))
        assert t.per_modality["text"] == {"ok": rows - 8, "failed": 4, "missing": 4,
                                          "failed_by_kind": {"corrupt": 4}, "input": rows - 4}


def test_done_hashes_are_the_written_ids(storage, bucket_uri):
    run_uri = join_uri(bucket_uri, "run")
    groups = _write_run(storage, run_uri)
    key = new_key()
    written = sorted({i for g in groups for i in g})
    expected = np.unique(hash_ids(written, key))
    assert len(list_parts(storage, run_uri)) == 4
    for use_ray in (True, False):
        hashes, weights = done_items(storage, run_uri, key, use_ray=use_ray)
        assert np.array_equal(hashes, expected)
        assert weights == {"text": {"sha256:aa": weights["text"]["sha256:aa"],
                                    "sha256:bb": join_uri(run_uri, part_name(groups[3]))}}
        assert weights["text"]["sha256:aa"] in list_parts(storage, run_uri)
    hashes, weights = done_items(storage, join_uri(bucket_uri, "nothing"), key)
    assert len(hashes) == 0 and weights == {}


def test_superseded_copies_are_parts_whose_every_id_is_in_a_part_kept(storage, bucket_uri):
    """Tried in order: of two parts repeating each other, the first goes and the second stays; a part
    holding one id found nowhere else stays; an id repeated inside the parts left stays repeated."""
    run_uri = join_uri(bucket_uri, "run")

    def part(attempt, *ids):
        return write_part(storage, run_uri, pa.table({"item_id": pa.array(list(ids), pa.string())}), attempt)

    ours_a, ours_b = part("ours", "a", "b", "c"), part("ours", "d", "e")
    late, mixed, same = part("old", "b", "d"), part("old", "c", "z"), part("old", "d", "e")
    assert same != ours_b
    assert superseded_copies(storage, [late, mixed, same, ours_a, ours_b]) == [late, same]
    assert superseded_copies(storage, [ours_b, same]) == [ours_b]  # the order decides which copy goes
    assert superseded_copies(storage, [mixed]) == []
    assert superseded_copies(storage, []) == []


def test_tally_names_the_parts_holding_repeated_ids(storage, bucket_uri):
    run_uri = join_uri(bucket_uri, "run")
    _write_run(storage, run_uri)
    repeated = tally(storage, run_uri, ["text"], use_ray=False).repeated_parts
    assert [set(storage.read_parquet(p, ["item_id"]).column("item_id").to_pylist()) & {"i1", "i2", "i3"}
            for p in repeated] == [{"i1", "i2", "i3"}] * 2


def test_committed_parts_are_the_manifests_list_or_for_older_runs_the_folder(storage, bucket_uri):
    run_uri = join_uri(bucket_uri, "run")
    _write_run(storage, run_uri)
    parts = list_parts(storage, run_uri)
    with pytest.raises(FileNotFoundError):
        committed_parts(storage, run_uri)  # not finished
    names = [p.rsplit("/", 1)[1] for p in parts[:2]]
    storage.write_json(join_uri(run_uri, "_MANIFEST.json"), {"output": {"uri": run_uri, "files": names}})
    assert committed_parts(storage, run_uri) == parts[:2]
    older = {"output": {"uri": run_uri, "parts": 4, "rows": 43}}
    assert committed_parts(storage, run_uri, older) == parts
    assert committed_parts(storage, run_uri, {"output": {"files": []}}) == []
