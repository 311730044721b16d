"""The retrieval side of one version: the fused index and the per-modality indexes, scatter-gather.

Every shard of an index is searched and the per-shard top-k merged (:class:`~tessera.index.ShardedIndex`);
excluded items (already seen) are filtered inside each shard, so ``k`` results come back whenever
the catalog has ``k`` other items. One replica holds every shard of a small index; for a large one,
the Retriever deployment is given a subset of shards per replica group (see ``shards`` below).

Example::

    r = RetrieverCore.load(storage, ref)
    ids, scores = r.search("fused", user_vectors, k=50, exclude=[{"item-00000001"}, set()])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tessera.index import SearchConfig, ShardedIndex, load_shard
from tessera.serving.version import VersionError, VersionRef
from tessera.storage import Storage, join_uri


class RetrieverCore:
    """The indexes of one version (no Ray). ``search`` is safe to call from several threads."""

    def __init__(self, ref: VersionRef, indexes: dict[str, ShardedIndex | None]):
        self.ref = ref
        self.indexes = indexes  # None: this group holds no shard of that index

    @classmethod
    def load(cls, storage: Storage, ref: VersionRef, search: SearchConfig | None = None,
             group: tuple[int, int] | None = None, modal: bool = True) -> RetrieverCore:
        """Load the fused index (all shards, or with ``group = (i, groups)`` the shards whose id is ``i``
        modulo ``groups``: one Retriever deployment's share; a group with no shard of this version answers
        no candidates) and, with ``modal``, every shard of the per-modality indexes.

        Every shard is verified against the checksum in its index manifest, and every per-modality
        index manifest against the checksum the version's manifest records for it.

        Raises:
            IndexCorruptError: a shard file, ``shard.json`` or a per-modality ``_MANIFEST.json`` whose
                checksum does not match.
        """
        if group is None:
            fused = _load(storage, ref.index_uri, ref.manifest, search, None)
        else:
            i, groups = group
            ids = [s.shard_id for s in ref.manifest.shards if s.shard_id % groups == i]
            fused = _load(storage, ref.index_uri, ref.manifest, search, ids) if ids else None
        indexes: dict[str, ShardedIndex | None] = {"fused": fused}
        if modal:
            from tessera.index import read_index_manifest

            for modality, entry in ref.manifest.modal_indexes.items():
                uri = join_uri(ref.index_uri, entry.path)
                manifest = read_index_manifest(storage, uri, expected_sha256=entry.manifest_sha256)
                indexes[modality] = _load(storage, uri, manifest, search, None)
        return cls(ref, indexes)

    def search(self, index: str, vectors: np.ndarray, k: int,
               exclude: Sequence[set[str]] | None = None) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` ids and scores per query vector in ``index`` (``fused`` or a modality)."""
        if index not in self.indexes:
            raise KeyError(f"no {index!r} index in version {self.ref.index_version} "
                           f"(it has {', '.join(self.indexes)})")
        found = self.indexes[index]
        if found is None:
            return [[] for _ in range(len(vectors))], np.full((len(vectors), k), -np.inf, np.float32)
        return found.search(vectors, k, exclude)


def _load(storage: Storage, uri: str, manifest, search: SearchConfig | None,
          shard_ids: Sequence[int] | None) -> ShardedIndex:
    wanted = manifest.shards if shard_ids is None else [s for s in manifest.shards if s.shard_id in set(shard_ids)]
    if not wanted:
        raise VersionError(f"none of shards {list(shard_ids or [])} exist in {uri} ({manifest.num_shards} shards)")
    sha = manifest.shard_manifest_sha256
    shards = [load_shard(storage, join_uri(uri, s.name), expected_manifest_sha256=sha[s.name]) for s in wanted]
    if shard_ids is not None:  # a subset: renumber 0..n-1 for ShardedIndex
        shards = [dataclasses.replace(s, shard_id=i) for i, s in enumerate(shards)]
    return ShardedIndex(shards, search, manifest if shard_ids is None else None)
