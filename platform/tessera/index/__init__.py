"""Item index: sharded ScaNN (exact numpy for small shards), single-process, no Ray.

* :mod:`tessera.index.params`: :class:`IndexConfig` and :func:`derive_params` (ScaNN's size rules).
* :mod:`tessera.index.sharding`: :func:`assign_shards`, a balanced deterministic split by id hash
  (:func:`shard_bounds` finds its cuts from the ids' hashes, :func:`locate_shard` an item's shard from them).
* :mod:`tessera.index.shard`: :func:`build_shard` (the per-shard unit a Ray task runs), :func:`search_shard`.
* :mod:`tessera.index.shard_io`: :func:`save_shard` / :func:`load_shard` with sha256-verified files.
* :mod:`tessera.index.sharded`: :class:`ShardedIndex` (search with exclusion, merge, load, save).
* :mod:`tessera.index.recall`: :func:`measure_recall` (the self-check's measure), whole or a shard at a
  time (:func:`shard_recall`, :func:`combine_recall`).
* :mod:`tessera.index.manifest`: :class:`IndexManifest` for ``index/<version>/_MANIFEST.json``.
* :mod:`tessera.index.exact`: :func:`exact_search` and :func:`recall_at_k`, the recall reference.

Example::

    from tessera.index import IndexConfig, ShardedIndex

    index = ShardedIndex.from_arrays(ids, vectors, IndexConfig(), num_shards=4)
    top_ids, scores = index.search(queries, k=10)
"""

from tessera.index.exact import exact_search, l2_normalize, recall_at_k
from tessera.index.manifest import (
    FAILED_REPORT,
    INDEX_MANIFEST,
    IndexManifest,
    ModalIndexRef,
    RecallCheck,
    make_index_manifest,
    read_index_manifest,
    write_index_manifest,
)
from tessera.index.params import IndexConfig, ScannParams, choose_mode, derive_params
from tessera.index.recall import RECALL_TIE_TOLERANCE, ShardRecall, combine_recall, measure_recall, shard_recall
from tessera.index.shard import ShardArtifact, build_shard, search_shard
from tessera.index.shard_io import (
    IndexCorruptError,
    ShardManifest,
    build_and_save_shard,
    load_shard,
    save_shard,
    shard_name,
)
from tessera.index.sharded import SearchConfig, ShardedIndex
from tessera.index.sharding import (
    assign_shards,
    hash_ids,
    locate_shard,
    num_shards_for,
    shard_bounds,
    shard_key,
    shard_sizes,
)

__all__ = [
    "FAILED_REPORT", "INDEX_MANIFEST", "RECALL_TIE_TOLERANCE", "IndexConfig", "IndexCorruptError", "IndexManifest",
    "ModalIndexRef", "RecallCheck", "ScannParams", "SearchConfig", "ShardArtifact", "ShardManifest", "ShardRecall",
    "ShardedIndex", "assign_shards", "build_and_save_shard", "build_shard", "choose_mode", "combine_recall",
    "derive_params", "exact_search", "hash_ids", "l2_normalize", "load_shard", "locate_shard", "make_index_manifest",
    "measure_recall", "num_shards_for", "read_index_manifest", "recall_at_k", "save_shard", "search_shard",
    "shard_bounds", "shard_key", "shard_name", "shard_recall", "shard_sizes", "write_index_manifest",
]
