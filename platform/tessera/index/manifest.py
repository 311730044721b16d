"""The index manifest, ``index/<version>/_MANIFEST.json``: what an index was built from and how.

It names the model version and embedding run the item vectors came from (so serving pairs query and
item vectors of the same model), the dimension, every shard's manifest (counts, build params, file
checksums, build seconds, self-check recall) with the checksum of each ``shard.json``, job timings,
and a recall self-check of the whole sharded index against exact search.

Example::

    manifest = make_index_manifest("v3", shard_manifests, build_config=cfg, model_version="m7",
                                   embedding_run="e12", recall_check=check)
    write_index_manifest(storage, "s3://bucket/index/v3", manifest)
    again = read_index_manifest(storage, "s3://bucket/index/v3")
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tessera.index.params import IndexConfig
from tessera.index.shard_io import IndexCorruptError, ShardManifest, manifest_bytes, manifest_sha256
from tessera.storage import Storage, join_uri

INDEX_MANIFEST = "_MANIFEST.json"
FAILED_REPORT = "_FAILED.json"
FORMAT_VERSION = 1


class RecallCheck(BaseModel):
    """Recall@k of the sharded index against exact search on a sample of queries
    (:func:`tessera.index.recall.measure_recall`)."""

    model_config = ConfigDict(extra="forbid")

    k: int
    num_queries: int
    recall: float
    queries: str = Field(default="sample of item vectors",
                         description="where the queries came from, e.g. 'held-out user vectors'")
    search_seconds: float | None = None
    tie_tolerance: float | None = Field(
        default=None, description="a returned item was a hit when its exact score was at least the exact k-th "
                                  "score less this (None: recorded before the rule, ids compared as sets)")
    query_items_excluded: bool | None = Field(
        default=None, description="item queries were searched without the item itself (None: recorded before "
                                  "the rule, the item counted as a hit)")
    seen_items_excluded: bool | None = Field(
        default=None, description="queries were searched without their user's seen items, in the exact answer "
                                  "too, as serving's exclude_seen searches (None: recorded before the rule, "
                                  "user queries searched over every item)")


class ModalIndexRef(BaseModel):
    """A per-modality index stored under the version root (``modal/<modality>/``).

    ``manifest_sha256`` is the sha256 of that index's ``_MANIFEST.json`` bytes; readers pass it to
    :func:`read_index_manifest` as ``expected_sha256``.
    """

    model_config = ConfigDict(extra="forbid")

    path: str
    num_items: int
    manifest_sha256: str


class IndexManifest(BaseModel):
    """Everything needed to trust and load one index version.

    ``build_config`` is kept as a plain mapping so that an old manifest still loads after
    :class:`IndexConfig` gains or loses fields.
    """

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    index_version: str
    model_version: str | None = None
    embedding_run: str | None = None
    similarity: str = "dot_product"
    dim: int
    num_items: int
    num_shards: int
    shards: list[ShardManifest]
    shard_manifest_sha256: dict[str, str]
    build_config: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    recall_check: RecallCheck | None = None
    recall_checks: dict[str, RecallCheck] = Field(
        default_factory=dict, description="every self-check by query source; recall_check is the worst of them")
    recall_floor: float | None = None
    modality: str | None = Field(default=None, description="set on a per-modality index")
    modal_indexes: dict[str, ModalIndexRef] = Field(default_factory=dict)
    counts: dict[str, int] = Field(default_factory=dict, description="items in, indexed, excluded (by reason)")
    item_vectors: list[str] = Field(default_factory=list, description="vectors parts, relative to the root")
    item_vectors_sha256: dict[str, str] = Field(
        default_factory=dict, description="per vectors part: sha256 of its item ids and fused vectors, what "
        "serving reads (tessera.index_job.vectors.served_part); empty in manifests written before it")
    source: dict[str, Any] = Field(default_factory=dict, description="the inputs' URIs and manifests' ids")
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @model_validator(mode="after")
    def _consistent(self) -> IndexManifest:
        if len(self.shards) != self.num_shards:
            raise ValueError(f"num_shards is {self.num_shards} but {len(self.shards)} shards are listed")
        if sum(s.count for s in self.shards) != self.num_items:
            raise ValueError(f"num_items is {self.num_items} but the shards hold {sum(s.count for s in self.shards)}")
        if [s.shard_id for s in self.shards] != list(range(self.num_shards)):
            raise ValueError("shards must be listed in order with ids 0..num_shards-1")
        if any(s.dim != self.dim for s in self.shards):
            raise ValueError(f"every shard must have dim {self.dim}")
        if any(s.num_shards not in (None, self.num_shards) for s in self.shards):
            raise ValueError(f"a shard records another shard count than num_shards ({self.num_shards})")
        if set(self.shard_manifest_sha256) != {s.name for s in self.shards}:
            raise ValueError("shard_manifest_sha256 must name exactly the listed shards")
        return self

    @property
    def shard_counts(self) -> dict[str, int]:
        """Items per shard, by shard name."""
        return {s.name: s.count for s in self.shards}


def make_index_manifest(index_version: str, shards: list[ShardManifest], *, build_config: IndexConfig | None = None,
                        model_version: str | None = None, embedding_run: str | None = None,
                        timings: dict[str, float] | None = None,
                        recall_check: RecallCheck | None = None) -> IndexManifest:
    """Assemble the manifest from the shard manifests :func:`~tessera.index.shard_io.save_shard` returned.

    Args:
        index_version: the version folder name (``index/<version>/``).
        shards: one manifest per shard, any order (sorted by shard id here).
        build_config: the config the shards were built with.
        model_version: the model whose item tower produced the vectors (None for raw embeddings).
        embedding_run: the embedding run the vectors came from.
        timings: job phase durations in seconds, e.g. ``{"read": 3.1, "build": 40.2}``.
        recall_check: result of :func:`tessera.index.recall.measure_recall`.

    Example::

        manifest = make_index_manifest("v1", [save_shard(storage, uri, s) for s in shards])
    """
    ordered = sorted(shards, key=lambda s: s.shard_id)
    if not ordered:
        raise ValueError("an index needs at least one shard")
    return IndexManifest(
        index_version=index_version, model_version=model_version, embedding_run=embedding_run,
        dim=ordered[0].dim, num_items=sum(s.count for s in ordered), num_shards=len(ordered), shards=ordered,
        shard_manifest_sha256={s.name: manifest_sha256(s) for s in ordered},
        build_config=build_config.model_dump(mode="json") if build_config else {},
        timings=dict(timings or {}), recall_check=recall_check,
    )


def write_index_manifest(storage: Storage, index_uri: str, manifest: IndexManifest, exclusive: bool = False) -> str:
    """Write ``<index_uri>/_MANIFEST.json``; returns its URI.

    Write it after every shard: its presence marks the index complete.

    Args:
        storage: where to write.
        index_uri: the index version's root, e.g. ``s3://bucket/index/v3``.
        manifest: from :func:`make_index_manifest`.
        exclusive: only if there is none yet (a conditional write: a published version is never replaced).

    Raises:
        FileExistsError: ``exclusive`` and a manifest is there.

    Example::

        write_index_manifest(storage, uri, make_index_manifest("v3", shard_manifests))
    """
    uri = join_uri(index_uri, INDEX_MANIFEST)
    if exclusive:
        data = manifest_bytes(manifest)
        # None: an object is there; ours if the write landed and its answer was lost (a retry then got 412)
        if storage.create_exclusive(uri, data) is None and storage.read_bytes(uri) != data:
            raise FileExistsError(f"{uri} exists: the index version was published by another build")
        return uri
    storage.write_bytes(uri, manifest_bytes(manifest), "application/json")
    return uri


def read_index_manifest(storage: Storage, index_uri: str, expected_sha256: str | None = None) -> IndexManifest:
    """Read and validate ``<index_uri>/_MANIFEST.json``.

    Args:
        storage: where to read.
        index_uri: the index version's root (or a per-modality index under it).
        expected_sha256: the sha256 the manifest's bytes must have, when another manifest records it
            (a per-modality index: :attr:`ModalIndexRef.manifest_sha256`).

    Example::

        manifest = read_index_manifest(storage, "s3://bucket/index/v3")
        print(manifest.model_version, manifest.shard_counts)
        ref = manifest.modal_indexes["text"]
        text = read_index_manifest(storage, join_uri(uri, ref.path), expected_sha256=ref.manifest_sha256)

    Raises:
        FileNotFoundError: there is no manifest (the index was never completely written).
        IndexCorruptError: the manifest does not parse, is inconsistent, or has another checksum than
            ``expected_sha256``.
    """
    uri = join_uri(index_uri, INDEX_MANIFEST)
    raw = storage.read_bytes(uri)
    if expected_sha256 is not None:
        got = hashlib.sha256(raw).hexdigest()
        if got != expected_sha256:
            raise IndexCorruptError("(index)", uri, f"sha256 mismatch: the referring manifest says "
                                                    f"{expected_sha256[:16]}..., the file is {got[:16]}...")
    try:
        return IndexManifest.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise IndexCorruptError("(index)", INDEX_MANIFEST, f"invalid: {'.'.join(map(str, first['loc']))}: "
                                                           f"{first['msg']} ({err.error_count()} errors)") from None
