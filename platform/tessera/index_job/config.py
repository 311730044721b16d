"""Config of the index job (``configs/index.yaml``).

The job reads one model bundle (``model_uri``); the bundle's manifest names the model version and
the embedding run its item tower was trained on, so the index is always built from the vectors of
that model over that run. The index is written to ``<output_uri>/<version>/`` where the version
defaults to the model version.

Sizing on a real cluster: ``num_shards`` x ``build.num_cpus`` CPUs build in parallel (one Ray task
per shard; ScaNN trains with ``build.num_cpus`` threads). Keep shards at or under ~1M points each
and give a task about 3x its shard's vector bytes of memory (``build.memory_gb``). Before the builds,
one task per run of vectors parts splits them by shard into Ray's object store, which holds every
index's vectors until their shards are built (at most ``(1 + modalities) x items x dim x 4`` bytes
with ``modal_indexes``, ``items x dim x 4`` without; Ray spills to local disk past the store's size).

Example::

    cfg = load_config(IndexJobConfig, "configs/index.yaml")
    cfg.num_shards = 4
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tessera.config import TesseraConfig
from tessera.index.params import IndexConfig
from tessera.storage import StorageConfig


class VectorStageConfig(TesseraConfig):
    """The Ray Data stage that runs the item tower: an actor pool, the tower loaded once per actor.

    Args:
        actors: actors in the pool.
        num_cpus: CPUs per actor (fractional on small nodes).
        num_gpus: GPUs per actor (0 on CPU clusters); with one (or a share of one), the actor runs the tower
            on CUDA. At most 1: an actor uses one device.
        batch_size: items per tower forward pass.
        torch_threads: intra-op threads per actor (None: torch's default).
        read_num_cpus: CPUs per read / write task.
        read_batch_rows: rows per block read from the embeddings parts.
    """

    actors: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0, le=1)
    batch_size: int = Field(256, ge=1)
    torch_threads: int | None = Field(1, ge=1)
    read_num_cpus: float = Field(0.1, gt=0)
    read_batch_rows: int = Field(1024, ge=1)


class BuildResources(TesseraConfig):
    """Resources of one shard build task (ScaNN's training threads follow ``num_cpus``).

    Args:
        num_cpus: CPUs per shard build task (and ScaNN training threads, rounded down, at least 1).
        memory_gb: memory reserved per task (None: no reservation).
        split_num_cpus: CPUs per task hashing one vectors part's ids for the plan, per task
            splitting one part by shard, and per task reading interaction-log files for the
            self-check's users (decoding and hashing: CPU-bound; a fraction lets Ray start
            many workers at once for little gain: 0.1 was 6x slower than 1 in
            ``bench/index_split.py`` on 2 cores).
    """

    num_cpus: float = Field(1.0, gt=0)
    memory_gb: float | None = Field(None, gt=0)
    split_num_cpus: float = Field(1.0, gt=0)

    @property
    def training_threads(self) -> int:
        return max(1, int(self.num_cpus))


class SelfCheckConfig(TesseraConfig):
    """Recall@k of the sharded index against exact search, on real queries.

    Args:
        recall_floor: the build fails when any checked recall is below it.
        k: the cut-off.
        user_queries: users sampled from the interaction log; their user vectors (user tower over
            their history, the last ``holdout`` events held out) are queries.
        item_queries: items sampled from the catalog; their fused vectors are queries (and, for each
            per-modality index, their vectors of that modality).
        tuning_user_queries: further users (never those the check measures) whose user vectors the
            fused index's shard builds tune on, beside the shards' own item vectors: user vectors
            sit much flatter over the items than item vectors do, so a reordering depth tuned on
            items alone can miss the target for users (0: tune on item vectors only).
        holdout: each sampled user's last events left out of the history.
        max_history: most recent history events fed to the user tower (None: the tower's own limit).
        seed: seeds the samples.
        memory_gb: memory reserved for the task running the user tower over the sampled users'
            histories (None: no reservation). The users are sampled by tasks reading the interaction
            log a file at a time (``build.split_num_cpus`` each); the checks run in the shard build
            tasks (``build.memory_gb``), on the vectors they hold: no task holds a whole index column
            or the whole log.
    """

    recall_floor: float = Field(0.95, ge=0, le=1)
    k: int = Field(10, ge=1)
    user_queries: int = Field(200, ge=0)
    item_queries: int = Field(200, ge=1)  # every index is checked on them (the modal ones on nothing else)
    tuning_user_queries: int = Field(200, ge=0)
    holdout: int = Field(1, ge=0)
    max_history: int | None = Field(None, ge=1)
    seed: int = 0
    memory_gb: float | None = Field(None, gt=0)

    def task_options(self, num_cpus: float) -> dict:
        """Ray task options of a check or tuning task."""
        return {"num_cpus": num_cpus, **({"memory": int(self.memory_gb * (1 << 30))} if self.memory_gb else {})}


class IndexJobConfig(TesseraConfig):
    """The index job.

    Args:
        model_uri: the model bundle (``models/<version>/``) whose item tower makes the vectors.
        output_uri: the index root; this build writes ``<output_uri>/<version>/``.
        version: the index version folder; None uses the model version from the bundle manifest.
        embeddings_uri: override the embedding run named by the bundle (same encoders required).
        interactions_uri: the interaction log for the self-check's user queries; None derives
            ``<corpus root>/corpus/interactions`` from the embedding run's items URI.
        num_shards: shards per index (balanced by item-id hash).
        modal_indexes: build one index per modality (``modal/<modality>/``) from the tower's
            single-modality projections, for same-modality search ("items whose image looks like this").
        no_modality: items without any usable modality: ``exclude`` (counted in the manifest and
            listed in the vectors table with their reason) or ``id_only`` (indexed by their hashed-id
            vector; needs a tower with ``num_id_buckets > 0``).
        index: ScaNN build settings (``training_threads`` is set from ``build.num_cpus``).
        build: resources per shard build task.
        vectors: the item-tower stage.
        self_check: the recall self-check.
        lease_ttl_s: a build holds its version through ``<version>/_LEASE.json``, renewed every quarter
            of this: a second build of the same version started meanwhile is refused (its shard writes
            would replace the first one's under its manifest), and one not renewed for this long (its
            build was killed) is taken over (at once when its holder was a process on this machine that
            has exited). See :mod:`tessera.lease`.
    """

    model_uri: str = "s3://tessera-demo/models/demo"
    output_uri: str = "s3://tessera-demo/index"
    version: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    embeddings_uri: str | None = None
    interactions_uri: str | None = None
    num_shards: int = Field(2, ge=1)
    modal_indexes: bool = True
    no_modality: Literal["exclude", "id_only"] = "exclude"
    index: IndexConfig = IndexConfig()
    build: BuildResources = BuildResources()
    vectors: VectorStageConfig = VectorStageConfig()
    self_check: SelfCheckConfig = SelfCheckConfig()
    storage: StorageConfig = StorageConfig()
    lease_ttl_s: float = Field(150.0, ge=5)

    def index_config(self) -> IndexConfig:
        """The shard build settings with ScaNN's training threads matched to the task's CPUs."""
        return self.index.model_copy(update={"training_threads": self.build.training_threads})
