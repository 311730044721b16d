"""Shard planning and the parallel shard builds: one Ray task per shard, reading only its own rows.

The driver reads the small ``item_id`` / ``status`` / ``modalities`` columns of the vectors parts,
splits each index's ids into balanced shards (:func:`tessera.index.assign_shards`), and starts one
task per shard. A task streams the vectors parts, keeps its own rows (``is_in`` on ``item_id``),
builds the shard with :func:`tessera.index.build_and_save_shard` (ScaNN training threads matching
its CPUs) and returns only the small shard manifest. Vectors never pass through the driver.

Index layout under ``index/<version>/``::

    shard-NNNN/                   the fused item index (status == ok)
    modal/<modality>/shard-NNNN/  one index per modality, over the items that have it
    modal/<modality>/_MANIFEST.json

Example::

    plans = plan_indexes(storage, summary.parts, cfg.num_shards, modalities=["text", "image"])
    manifests = build_all(storage, plans, summary.parts, src.index_uri, cfg)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tessera.index import IndexConfig, ShardManifest, assign_shards, build_and_save_shard
from tessera.index_job.sources import IndexSourceError
from tessera.index_job.vectors import FUSED, STATUS_OK, column_matrix
from tessera.storage import Storage, join_uri


class IndexIntegrityError(RuntimeError):
    """The vectors written do not hold every input item exactly once (the job exits 4)."""


MODAL_DIR = "modal"


@dataclass
class IndexPlan:
    """One index to build: its folder (relative to the version root), vector column and shards.

    Attributes:
        name: ``fused`` or the modality name.
        path: relative folder, ``""`` for the fused index, ``modal/<modality>`` otherwise.
        column: the vectors column it indexes.
        shards: per shard, its item ids.
    """

    name: str
    path: str
    column: str
    shards: list[list[str]]

    @property
    def num_items(self) -> int:
        return sum(len(s) for s in self.shards)


def read_id_columns(storage: Storage, parts: list[str]) -> pa.Table:
    """``item_id``, ``status``, ``modalities`` of every vectors part (small: no vectors read)."""
    tables = []
    for uri in parts:
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            tables.append(pq.read_table(f, columns=["item_id", "status", "modalities"]))
    return pa.concat_tables(tables)


def plan_indexes(storage: Storage, parts: list[str], num_shards: int, modalities: list[str]) -> list[IndexPlan]:
    """The fused index and one index per modality in ``modalities``, each split into balanced shards.

    An index with fewer items than ``num_shards`` gets one shard per item (at least one).

    Raises:
        ValueError: no item can be indexed.
    """
    table = read_id_columns(storage, parts)
    ids = np.asarray(table.column("item_id").to_pylist(), dtype=object)
    status = np.asarray(table.column("status").to_pylist(), dtype=object)
    present = [set(filter(None, s.split(","))) for s in table.column("modalities").to_pylist()]
    wanted = [("fused", "", FUSED, ids[status == STATUS_OK])]
    for m in modalities:
        rows = np.asarray([m in p for p in present], dtype=bool)
        wanted.append((m, f"{MODAL_DIR}/{m}", m, ids[rows]))
    plans = []
    for name, path, column, members in wanted:
        if len(members) == 0:
            if name == "fused":
                raise IndexSourceError("no item has a usable modality: there is nothing to index")
            continue
        members = members.tolist()
        parts_rows = assign_shards(members, max(1, min(num_shards, len(members))))
        plans.append(IndexPlan(name, path, column, [[members[r] for r in rows] for rows in parts_rows]))
    return plans


def read_rows(storage: Storage, parts: list[str], column: str, ids: list[str] | None = None,
              ) -> tuple[list[str], np.ndarray]:
    """Ids and (N, D) vectors of ``column`` for ``ids`` (None: every non-null row), part by part."""
    value_set = None if ids is None else pa.array(ids, pa.string())
    got_ids, blocks, dim = [], [], None
    for uri in parts:
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=["item_id", column])
        keep = pc.is_valid(table.column(column))
        if value_set is not None:
            keep = pc.and_(keep, pc.is_in(table.column("item_id"), value_set=value_set))
        table = table.filter(keep)
        dim = table.schema.field(column).type.list_size
        if table.num_rows:
            got_ids.extend(table.column("item_id").to_pylist())
            blocks.append(column_matrix(table.column(column), dim))
    vectors = np.concatenate(blocks) if blocks else np.empty((0, dim or 0), np.float32)
    return got_ids, vectors


def build_shard_task(storage: Storage, parts: list[str], column: str, ids: list[str], shard_id: int,
                     index_uri: str, config: IndexConfig, catalog_size: int,
                     tuning_queries: np.ndarray | None = None, num_shards: int | None = None) -> ShardManifest:
    """Body of one shard's Ray task: read its rows, build (tuning also on ``tuning_queries``), save
    with checksums (and the index's ``num_shards``), return the manifest."""
    got_ids, vectors = read_rows(storage, parts, column, ids)
    if len(got_ids) != len(ids):
        raise IndexIntegrityError(f"{index_uri} shard {shard_id}: found {len(got_ids)} of its {len(ids)} "
                                  "items in the vectors parts")
    return build_and_save_shard(storage, index_uri, shard_id, got_ids, vectors, config, catalog_size, tuning_queries,
                                num_shards=num_shards)


def build_all(storage: Storage, plans: list[IndexPlan], parts: list[str], index_uri: str, config: IndexConfig,
              num_cpus: float, memory_gb: float | None = None,
              tuning_queries: dict[str, np.ndarray] | None = None) -> dict[str, list[ShardManifest]]:
    """Build every shard of every planned index as parallel Ray tasks; manifests by index name.

    Args:
        storage: object storage.
        plans: from :func:`plan_indexes`.
        parts: the vectors parts.
        index_uri: the version root.
        config: shard build settings (``training_threads`` matching ``num_cpus``).
        num_cpus: CPUs per task.
        memory_gb: memory reserved per task (None: none).
        tuning_queries: by index name, real queries its shards also tune on (e.g. user vectors for
            ``fused``); put in the object store once and shared by that index's tasks.
    """
    import ray

    options = {"num_cpus": num_cpus, "max_retries": 1}
    if memory_gb:
        options["memory"] = int(memory_gb * (1 << 30))
    task = ray.remote(build_shard_task).options(**options)
    tuning_queries = tuning_queries or {}
    pending = {}
    for plan in plans:
        uri = join_uri(index_uri, plan.path) if plan.path else index_uri
        queries = tuning_queries.get(plan.name)
        queries_ref = ray.put(queries) if queries is not None and len(queries) else None
        pending[plan.name] = [task.remote(storage, parts, plan.column, ids, i, uri, config, plan.num_items,
                                          queries_ref, len(plan.shards)) for i, ids in enumerate(plan.shards)]
    return {name: ray.get(refs) for name, refs in pending.items()}
