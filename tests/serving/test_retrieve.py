"""RetrieverCore over indexes saved to the real S3 store: every manifest it reads is checked."""

import hashlib
import json

import numpy as np
import pytest

from tessera.index import IndexConfig, IndexCorruptError, ModalIndexRef, ShardedIndex, write_index_manifest
from tessera.index.shard_io import manifest_bytes
from tessera.serving import VersionRef
from tessera.serving.retrieve import RetrieverCore
from tessera.storage import join_uri
from tests.index.conftest import unit_rows


def test_per_modality_manifest_is_verified_against_its_checksum(storage, bucket_uri):
    rng = np.random.default_rng(21)
    ids = [f"item-{i:03d}" for i in range(300)]
    fused, text = unit_rows(rng, 300, 16), unit_rows(rng, 300, 8)
    text_manifest = ShardedIndex.from_arrays(ids, text, IndexConfig(), num_shards=2).save(
        storage, join_uri(bucket_uri, "modal", "text"))
    top = ShardedIndex.from_arrays(ids, fused, IndexConfig(), num_shards=2).save(storage, bucket_uri)
    top.modal_indexes["text"] = ModalIndexRef(path="modal/text", num_items=300,
                                              manifest_sha256=hashlib.sha256(manifest_bytes(text_manifest)).hexdigest())
    write_index_manifest(storage, bucket_uri, top)
    ref = VersionRef(index_uri=bucket_uri, manifest=top, model_uri="(not read)", bundle_manifest={},
                     embedding_run="(not read)", interactions_uri=None)
    retriever = RetrieverCore.load(storage, ref)
    found, _ = retriever.search("text", text[:3], k=1)
    assert found == [[i] for i in ids[:3]]
    # the text index's manifest replaced by another valid one (say, of a rebuilt index): refused
    target = join_uri(bucket_uri, "modal", "text", "_MANIFEST.json")
    doc = json.loads(storage.read_bytes(target))
    doc["embedding_run"] = "another-run"
    storage.write_bytes(target, json.dumps(doc).encode())
    with pytest.raises(IndexCorruptError, match=r"file s3://.*/modal/text/_MANIFEST\.json: sha256 mismatch"):
        RetrieverCore.load(storage, ref)
    assert set(RetrieverCore.load(storage, ref, modal=False).indexes) == {"fused"}


def test_retriever_groups_split_the_shards_and_merge_to_the_whole_index(storage, bucket_uri):
    """``retriever_groups``: group i holds the shards whose id is i modulo the group count; merged, the
    groups' answers are the whole index's; a group with no shard of the version answers no candidates."""
    from serve_apps.recommender import merge_top_k

    rng = np.random.default_rng(5)
    ids = [f"item-{i:03d}" for i in range(400)]
    vectors = unit_rows(rng, 400, 16)
    root = join_uri(bucket_uri, "groups")
    manifest = ShardedIndex.from_arrays(ids, vectors, IndexConfig(), num_shards=3).save(storage, root)
    write_index_manifest(storage, root, manifest)
    ref = VersionRef(index_uri=root, manifest=manifest, model_uri="(not read)", bundle_manifest={},
                     embedding_run="(not read)", interactions_uri=None)
    queries = unit_rows(rng, 5, 16)
    whole_ids, whole_scores = RetrieverCore.load(storage, ref).search("fused", queries, k=10)
    for groups in (2, 3):
        parts = [RetrieverCore.load(storage, ref, group=(i, groups)).search("fused", queries, k=10)
                 for i in range(groups)]
        merged_ids, merged_scores = merge_top_k(parts, 10)
        assert merged_ids == whole_ids and np.allclose(merged_scores, whole_scores, atol=1e-5)
    empty = RetrieverCore.load(storage, ref, group=(3, 4))  # 3 shards over 4 groups: the last has none
    assert empty.indexes["fused"] is None
    none_ids, none_scores = empty.search("fused", queries, k=10)
    assert none_ids == [[]] * 5 and none_scores.shape == (5, 10) and np.isneginf(none_scores).all()
    parts = [RetrieverCore.load(storage, ref, group=(i, 4)).search("fused", queries, k=10) for i in range(4)]
    assert merge_top_k(parts, 10)[0] == whole_ids
