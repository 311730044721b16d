"""The index job's Ray wiring: item vectors (Ray Data), parallel shard builds and self-checks (Ray tasks).

* :mod:`tessera.index_job.config`: :class:`IndexJobConfig` (``configs/index.yaml``).
* :mod:`tessera.index_job.sources`: the bundle, its embedding run and the interaction log.
* :mod:`tessera.index_job.vectors`: the item tower over every item (fused + per-modality vectors).
* :mod:`tessera.index_job.build`: shard planning, the split by shard, one build task per shard.
* :mod:`tessera.index_job.self_check`: recall@k of the saved index vs exact search on real queries,
  measured a shard at a time in the build tasks and merged on the driver.
* :mod:`tessera.index_job.job`: :func:`run_index_job`, the whole job.
* :mod:`tessera.index_job.seeded_bundle`: a placeholder untrained bundle for tests and demos.

The single-process index (ScaNN shards, ``ShardedIndex``) lives in :mod:`tessera.index`; this
package imports it, never the other way round.

Example::

    from tessera.config import load_config
    from tessera.index_job import IndexJobConfig, run_index_job

    manifest = run_index_job(load_config(IndexJobConfig, "configs/index.yaml"))
"""

from tessera.index_job.config import BuildResources, IndexJobConfig, SelfCheckConfig, VectorStageConfig
from tessera.index_job.job import IndexExistsError, IndexIntegrityError, IndexRecallError, run_index_job
from tessera.index_job.sources import IndexSourceError

__all__ = [
    "BuildResources", "IndexExistsError", "IndexIntegrityError", "IndexJobConfig", "IndexRecallError",
    "IndexSourceError", "SelfCheckConfig", "VectorStageConfig", "run_index_job",
]
