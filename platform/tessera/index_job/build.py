"""Shard planning, the split of the vectors by shard, and the parallel shard builds (Ray tasks).

    vectors parts ─► scan (id hashes) ─► plan (driver) ─► split (a task per run of parts)
    ─► S x (1 + M) builds and self-checks (a task a shard)

A shard is a range of ``(id hash, id)`` keys: the split :func:`tessera.index.assign_shards` makes.
The scan (:func:`tessera.embed.ids.map_files`: Ray tasks of 64 parts each once there are many)
reads each part's small ``item_id`` / ``status`` / ``modalities`` columns and keeps only the ids'
64-bit hashes, per index; from those the driver finds each index's shard sizes and
its ``S - 1`` cuts (:func:`tessera.index.shard_bounds`), holding 8 bytes an item and no id strings.
One split task per run of consecutive parts (:func:`group_parts`: runs long enough that every piece
reaches ~1 MiB) then reads them once and returns one piece (ids + vectors) per shard of every index
into Ray's object store; each shard's build task takes its pieces, one from each run, in part order.
So every part is read once whatever the shard count (the builds used to read every part each), the
pieces move only to the node building their shard, and a piece lost with a node is made again by
re-running its split task (Ray's lineage reconstruction). The split tasks also pick out the rows the
self-check asked for (sampled item queries, the sampled users' history items). The build task builds
the shard with :func:`tessera.index.build_shard` (ScaNN training threads matching its CPUs), saves
it with :func:`tessera.index.save_shard` if the build still holds its lease, loads it back and
measures its share of the self-check against the vectors it holds (:mod:`tessera.index_job.self_check`),
and returns only the small shard manifest and that share.
Vectors do not pass through the driver, except the pieces of an index too small to fill them (Ray
keeps returns under 100 KiB in the owner's memory).

Index layout under ``index/<version>/``::

    shard-NNNN/                   the fused item index (status == ok)
    modal/<modality>/shard-NNNN/  one index per modality, over the items that have it
    modal/<modality>/_MANIFEST.json

Example::

    scan = scan_ids(storage, summary.parts, ["fused", "text", "image"])
    plans = plan_indexes(scan, cfg.num_shards, modalities=["text", "image"])
    split = split_vectors(storage, plans, summary.parts, scan.part_rows)
    built = build_shards(storage, plans, split.pieces, src.index_uri, cfg.index_config(), num_cpus=1)
    built["fused"][0].manifest
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tessera.embed.ids import colliding, is_member, map_files
from tessera.index import (
    IndexConfig,
    ShardManifest,
    ShardRecall,
    build_shard,
    hash_ids,
    locate_shard,
    save_shard,
    shard_bounds,
    shard_key,
    shard_sizes,
)
from tessera.index.shard_io import manifest_sha256
from tessera.index_job.self_check import Piece, UserQueries, check_saved_shard
from tessera.index_job.sources import IndexSourceError
from tessera.index_job.vectors import FUSED, column_matrix, in_fused_index
from tessera.lease import LeaseRef
from tessera.storage import Storage, join_uri


class IndexIntegrityError(RuntimeError):
    """The vectors written do not hold every input item exactly once (the job exits 4)."""


MODAL_DIR = "modal"
ALL_ROWS = "*"  # the scan's name for every row of the vectors parts, whichever index holds it


@dataclass
class IndexPlan:
    """One index to build: its folder (relative to the version root), vector column and shards.

    Attributes:
        name: ``fused`` or the modality name (which rows it holds: :func:`index_rows`).
        path: relative folder, ``""`` for the fused index, ``modal/<modality>`` otherwise.
        column: the vectors column it indexes.
        sizes: items per shard (as :func:`tessera.index.assign_shards` splits them).
        bounds: the shards' cuts (:func:`tessera.index.shard_bounds`): a split task routes a row with
            them and nothing else.
    """

    name: str
    path: str
    column: str
    sizes: list[int]
    bounds: list[tuple[int, str]]

    @property
    def num_items(self) -> int:
        return sum(self.sizes)

    @property
    def num_shards(self) -> int:
        return len(self.sizes)


def index_rows(table: pa.Table, name: str) -> np.ndarray:
    """Rows of a vectors table in the index ``name``: ``fused`` holds ``status == ok``, a modality's
    index the items that have that modality; :data:`ALL_ROWS` every row. The planner and the split
    tasks both decide by this."""
    if name == ALL_ROWS:
        return np.ones(table.num_rows, bool)
    if name == "fused":
        return in_fused_index(table.column("status"))
    return np.asarray([name in filter(None, s.split(",")) for s in table.column("modalities").to_pylist()], bool)


def read_id_columns(storage: Storage, uri: str) -> pa.Table:
    """``item_id``, ``status``, ``modalities`` of one vectors part (small: no vectors read)."""
    return storage.read_parquet(uri, ["item_id", "status", "modalities"])


def hash_part(uri: str, storage: Storage, names: list[str]) -> dict[str, np.ndarray]:
    """One part of the scan: the id hashes (uint64) of a vectors part's rows, of every row
    (:data:`ALL_ROWS`) and of the rows of each index in ``names``."""
    table = read_id_columns(storage, uri)
    hashes = hash_ids(table.column("item_id").to_pylist())
    return {name: hashes[index_rows(table, name)] for name in [ALL_ROWS, *names]}


def part_ids_with_hashes(uri: str, storage: Storage, name: str, wanted: np.ndarray) -> list[str]:
    """The ids of a vectors part's rows of index ``name`` whose hash is in sorted ``wanted``, in order."""
    table = read_id_columns(storage, uri)
    ids = np.asarray(table.column("item_id").to_pylist(), dtype=object)[index_rows(table, name)]
    return ids[is_member(wanted, hash_ids(ids.tolist()))].tolist()


@dataclass
class IdScan:
    """The id hashes of every vectors part, by index: 8 bytes an item on the driver, no id strings.

    Attributes:
        storage: where the parts are.
        parts: the vectors parts.
        hashes: by index name (and :data:`ALL_ROWS`), the hashes of its rows, part after part.
        part_rows: by index name, its rows in each part (what :func:`group_parts` sizes groups by).
        num_cpus: CPUs per task of a read of every part (:func:`tessera.embed.ids.map_files`).
    """

    storage: Storage
    parts: list[str]
    hashes: dict[str, np.ndarray]
    part_rows: dict[str, list[int]] = field(default_factory=dict)
    num_cpus: float = 1.0

    @property
    def rows(self) -> int:
        return len(self.hashes[ALL_ROWS])

    def ids_with_hashes(self, wanted: set[int], name: str = ALL_ROWS) -> list[str]:
        """The ids of the rows of index ``name`` whose hash is in ``wanted``, with repeats (a read of
        every part's ids: only for the rare shared hash)."""
        sorted_wanted = np.unique(np.fromiter(wanted, np.uint64, count=len(wanted)))
        found = map_files(part_ids_with_hashes, self.parts, self.storage, name, sorted_wanted, num_cpus=self.num_cpus)
        return [i for ids in found for i in ids]

    def distinct_items(self) -> int:
        """Distinct item ids over every row: from the hashes, reading ids only for hashes seen twice."""
        distinct, repeated = colliding([self.hashes[ALL_ROWS]])
        if not len(repeated):
            return distinct
        return distinct - len(repeated) + len(set(self.ids_with_hashes({int(h) for h in repeated})))


def scan_ids(storage: Storage, parts: list[str], names: list[str], num_cpus: float = 1.0) -> IdScan:
    """Hash every vectors part's ids (:func:`tessera.embed.ids.map_files`: in Ray tasks of many parts
    each once there are many parts, else here; only hashes come back).

    Args:
        storage: object storage.
        parts: the vectors parts.
        names: the indexes to plan (``fused`` and modalities).
        num_cpus: CPUs per task.
    """
    by_part = map_files(hash_part, parts, storage, names, num_cpus=num_cpus)
    hashes = {name: np.concatenate([h[name] for h in by_part]) if by_part else np.empty(0, np.uint64)
              for name in [ALL_ROWS, *names]}
    part_rows = {name: [len(h[name]) for h in by_part] for name in [ALL_ROWS, *names]}
    return IdScan(storage, list(parts), hashes, part_rows, num_cpus)


def plan_indexes(scan: IdScan, num_shards: int, modalities: list[str]) -> list[IndexPlan]:
    """The fused index and one index per modality in ``modalities``, each split into balanced shards
    (the split :func:`tessera.index.assign_shards` makes of its ids, found from their hashes).

    An index with fewer items than ``num_shards`` gets one shard per item (at least one).

    Args:
        scan: from :func:`scan_ids` over at least ``fused`` and ``modalities``.
        num_shards: shards per index.
        modalities: the per-modality indexes to build.

    Raises:
        IndexSourceError: no item can be indexed.
    """
    plans = []
    for name, path, column in [("fused", "", FUSED), *((m, f"{MODAL_DIR}/{m}", m) for m in modalities)]:
        hashes = scan.hashes[name]
        if len(hashes) == 0:
            if name == "fused":
                raise IndexSourceError("no item has a usable modality: there is nothing to index")
            continue
        count = max(1, min(num_shards, len(hashes)))
        bounds = shard_bounds(hashes, count, tied_ids=lambda h, name=name: scan.ids_with_hashes({h}, name))
        plans.append(IndexPlan(name, path, column, shard_sizes(len(hashes), count), bounds))
    return plans


# Ray keeps a task's return under 100 KiB (max_direct_call_object_size) in its owner's memory, here the
# driver's, and copies it into each task that takes it; larger ones go to the object store of the node
# that made them. Split tasks take consecutive parts until each piece should reach MIN_PIECE_BYTES, so
# the vectors stay in the object store; MAX_GROUP_BYTES bounds one task's read (an index too small to
# fill its pieces then has small ones: little in all).
MIN_PIECE_BYTES = 1 << 20
MAX_GROUP_BYTES = 128 << 20


def group_parts(parts: list[str], part_rows: dict[str, list[int]], plans: list[IndexPlan], dims: dict[str, int],
                min_piece_bytes: int = MIN_PIECE_BYTES, max_group_bytes: int = MAX_GROUP_BYTES) -> list[list[str]]:
    """Consecutive runs of the vectors parts, one split task each (part order kept); ``part_rows`` is
    :attr:`IdScan.part_rows`.

    A run closes once every index's pieces of it (its rows in the run x ``dims[column]`` x 4 bytes,
    over its shard count) reach ``min_piece_bytes``, or its vectors reach ``max_group_bytes``.
    """
    groups: list[list[str]] = []
    current: list[str] = []
    held = dict.fromkeys((p.name for p in plans), 0)
    for k, uri in enumerate(parts):
        current.append(uri)
        for plan in plans:
            held[plan.name] += part_rows[plan.name][k] * dims[plan.column] * 4
        if (all(held[p.name] / p.num_shards >= min_piece_bytes for p in plans)
                or sum(held.values()) >= max_group_bytes):
            groups.append(current)
            current, held = [], dict.fromkeys(held, 0)
    if current:
        groups.append(current)
    return groups


def vector_dims(storage: Storage, uri: str, columns: list[str]) -> dict[str, int]:
    """The list size of each vectors column, from one part's Parquet schema (no rows read)."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        schema = pq.read_schema(f)
    return {c: schema.field(c).type.list_size for c in columns}


def split_part(storage: Storage, uris: list[str], plans: list[IndexPlan],
               samples: dict[str, np.ndarray] | None = None, wanted: list[str] | None = None) -> list[Piece]:
    """Body of one split task: read a run of vectors parts once, return their rows of every shard of
    every index, and the rows the self-check asked for.

    Args:
        storage: object storage.
        uris: the run of parts, in order.
        plans: the indexes.
        samples: by index name, positions among that index's rows in this run (the item queries).
        wanted: item ids whose fused vectors are wanted (the sampled users' histories), whether the fused
            index holds them or not: a history keeps an item without a usable modality, as training does.

    Returns:
        One piece per shard, index after index in ``plans`` order, shards in order (empty pieces
        included, so the task's ``num_returns`` is fixed); then one piece per index of its sampled
        rows; then one piece of the wanted rows' fused vectors (empty without a ``fused`` plan). Rows
        keep the parts' order.

    Raises:
        IndexIntegrityError: a row of an index, or a wanted row, without its vector (a null in that column).
    """
    columns = list(dict.fromkeys(["item_id", "status", "modalities", *(p.column for p in plans)]))
    table = pa.concat_tables([storage.read_parquet(uri, columns) for uri in uris])
    ids = table.column("item_id").to_pylist()
    keys = [shard_key(i) for i in ids] if any(p.num_shards > 1 for p in plans) else []
    samples = samples or {}
    wanted_set = set(wanted or ())
    pieces: list[Piece] = []
    sampled: list[Piece] = []
    asked: Piece = ([], np.empty((0, 0), np.float32))
    for plan in plans:
        rows = np.flatnonzero(index_rows(table, plan.name))
        column = table.column(plan.column).take(pa.array(rows, pa.int64()))
        if column.null_count:
            raise IndexIntegrityError(f"{', '.join(uris)}: {column.null_count} rows of the {plan.name} index "
                                      f"without a {plan.column} vector")
        vectors = column_matrix(column, table.schema.field(plan.column).type.list_size)
        shard_of = np.fromiter((locate_shard(keys[r], plan.bounds) for r in rows), np.int64, count=len(rows)) \
            if plan.num_shards > 1 else np.zeros(len(rows), np.int64)
        for s in range(plan.num_shards):
            sel = np.flatnonzero(shard_of == s)
            pieces.append(([ids[rows[j]] for j in sel], vectors[sel]))
        picked = np.asarray(samples.get(plan.name, ()), np.int64)
        sampled.append(([ids[rows[j]] for j in picked], vectors[picked]))
    if any(plan.name == "fused" for plan in plans):  # every row's fused vector, in the fused index or not
        sel = np.asarray([r for r, item in enumerate(ids) if item in wanted_set] if wanted_set else [], np.int64)
        column = table.column(FUSED).take(pa.array(sel, pa.int64()))
        if column.null_count:
            raise IndexIntegrityError(f"{', '.join(uris)}: {column.null_count} rows without a {FUSED} vector "
                                      "(a vectors part written before every item had one: rebuild it)")
        asked = ([ids[r] for r in sel], column_matrix(column, table.schema.field(FUSED).type.list_size))
    return [*pieces, *sampled, asked]


def assemble_shard(pieces: tuple[Piece, ...], expected: int, where: str) -> Piece:
    """One shard's ids and vectors from its pieces, in order, into one array (one copy).

    Raises:
        IndexIntegrityError: the pieces do not hold the ``expected`` number of rows.
    """
    found = sum(len(p_ids) for p_ids, _ in pieces)
    if found != expected:
        raise IndexIntegrityError(f"{where}: found {found} of its {expected} items in the vectors parts")
    dim = pieces[0][1].shape[1]  # empty pieces keep their (0, D) shape
    ids: list[str] = []
    vectors = np.empty((expected, dim), np.float32)
    for p_ids, piece in pieces:
        vectors[len(ids):len(ids) + len(p_ids)] = piece
        ids.extend(p_ids)
    return ids, vectors


@dataclass
class BuiltShard:
    """What a shard's build task returns: its manifest, and its share of the index's self-check (by
    query source, see :func:`tessera.index_job.self_check.check_saved_shard`) with the seconds it took."""

    manifest: ShardManifest
    checks: dict[str, ShardRecall] = field(default_factory=dict)
    check_seconds: float = 0.0


def build_shard_task(num_items: int, shard_id: int, storage: Storage, index_uri: str, config: IndexConfig,
                     catalog_size: int, tuning_queries: np.ndarray | None, num_shards: int, check_k: int | None,
                     user_queries: UserQueries | None, item_queries: Piece | None, *pieces: Piece,
                     lease: LeaseRef | None = None) -> BuiltShard:
    """Body of one shard's Ray task: assemble its pieces (Ray resolves them before the task runs:
    they are its top-level arguments), build (tuning also on ``tuning_queries``), save with
    checksums (and the index's ``num_shards``), then, with ``check_k``, load the shard back and measure
    it on the check's queries against the vectors at hand. With ``lease``, the build's lease is checked
    between the build and the save: a build whose lease was taken over (its driver hung past the ttl,
    or ``--break-lease``) writes no shard over the new build's.

    Raises:
        LeaseLostError: the lease no longer holds ``lease``'s token; nothing written."""
    ids, vectors = assemble_shard(pieces, num_items, f"{index_uri} shard {shard_id}")
    shard = build_shard(ids, vectors, config, shard_id, catalog_size, tuning_queries)
    if lease is not None:
        lease.verify(storage)
    manifest = save_shard(storage, index_uri, shard, num_shards)
    if check_k is None:
        return BuiltShard(manifest)
    start = time.perf_counter()
    checks = check_saved_shard(storage, join_uri(index_uri, manifest.name),
                               manifest_sha256(manifest), ids, vectors, user_queries, item_queries, check_k)
    return BuiltShard(manifest, checks, time.perf_counter() - start)


@dataclass
class SplitRefs:
    """The split tasks' returns (Ray object refs), by run of parts ``g``.

    Attributes:
        pieces: ``pieces[t][g]``, run ``g``'s piece of shard ``t``, shards numbered over the plans in
            order (the first plan's shards first).
        samples: by index name, each run's sampled rows (the item queries).
        wanted: each run's rows (fused vectors) of the wanted items.
    """

    pieces: list[list]
    samples: dict[str, list]
    wanted: list

    def take_pieces(self) -> list[list]:
        """:attr:`pieces`, no longer held here: pass them on (:func:`build_shards`) without keeping a
        reference, so that each piece is freed once the task reading it has finished."""
        pieces, self.pieces = self.pieces, []
        return pieces


def split_vectors(storage: Storage, plans: list[IndexPlan], parts: list[str], part_rows: dict[str, list[int]],
                  num_cpus: float = 1.0, min_piece_bytes: int = MIN_PIECE_BYTES,
                  samples: dict[str, np.ndarray] | None = None, wanted: list[str] | None = None) -> SplitRefs:
    """Start the split tasks (one per run of parts, :func:`group_parts`).

    Args:
        storage: object storage.
        plans: from :func:`plan_indexes`.
        parts: the vectors parts (their order is each shard's row order).
        part_rows: :attr:`IdScan.part_rows` of the scan the plans came from.
        num_cpus: CPUs per split task.
        min_piece_bytes: the size each piece should reach (see :data:`MIN_PIECE_BYTES`).
        samples: by index name, sorted positions among its rows (in part order) to pick out.
        wanted: item ids whose fused vectors to pick out (put in the object store once).
    """
    import ray

    dims = vector_dims(storage, parts[0], list(dict.fromkeys(p.column for p in plans)))
    groups = group_parts(parts, part_rows, plans, dims, min_piece_bytes)
    total = sum(plan.num_shards for plan in plans)
    split = ray.remote(split_part).options(num_cpus=num_cpus, num_returns=total + len(plans) + 1)
    wanted_ref = ray.put(list(wanted)) if wanted else None
    samples = samples or {}
    by_group, offset, first_part = [], dict.fromkeys((p.name for p in plans), 0), 0
    for uris in groups:
        local = {}
        for plan in plans:  # the sampled positions among this run's rows of each index
            rows = sum(part_rows[plan.name][first_part:first_part + len(uris)])
            picked = np.asarray(samples.get(plan.name, ()), np.int64)
            picked = picked[(picked >= offset[plan.name]) & (picked < offset[plan.name] + rows)] - offset[plan.name]
            if len(picked):
                local[plan.name] = picked
            offset[plan.name] += rows
        first_part += len(uris)
        by_group.append(split.remote(storage, uris, plans, local, wanted_ref))
    return SplitRefs(pieces=[[refs[t] for refs in by_group] for t in range(total)],
                     samples={p.name: [refs[total + j] for refs in by_group] for j, p in enumerate(plans)},
                     wanted=[refs[-1] for refs in by_group])


def build_shards(storage: Storage, plans: list[IndexPlan], pieces: list[list], index_uri: str, config: IndexConfig,
                 num_cpus: float, memory_gb: float | None = None, tuning_queries: dict | None = None,
                 check_k: int | None = None, check_queries: dict[str, tuple] | None = None,
                 lease: LeaseRef | None = None) -> dict[str, list[BuiltShard]]:
    """Build every shard of every planned index from its pieces (:attr:`SplitRefs.pieces`) as parallel
    Ray tasks, each checking its shard when ``check_k`` is set; results by index name, in shard order.
    Each task is scheduled once its pieces exist and fetches only them: no task reads the vectors parts.

    Args:
        storage: object storage (the shards are written there).
        plans: from :func:`plan_indexes`.
        pieces: from :func:`split_vectors` over the same plans.
        index_uri: the version root.
        config: shard build settings (``training_threads`` matching ``num_cpus``).
        num_cpus: CPUs per build task.
        memory_gb: memory reserved per build task (None: none).
        tuning_queries: by index name, real queries its shards also tune on (e.g. user vectors for
            ``fused``): an array or an object ref, shared by that index's tasks.
        check_k: the self-check's cut-off (None: no check).
        check_queries: by index name, ``(user queries, item queries piece)`` (:class:`UserQueries`,
            pieces or object refs; either may be None), measured on every shard of that index.
        lease: the build's lease, checked by each task before it saves its shard (None: not checked).
    """
    import ray

    options = {"num_cpus": num_cpus, "max_retries": 1}
    if memory_gb:
        options["memory"] = int(memory_gb * (1 << 30))
    task = ray.remote(build_shard_task).options(**options)
    tuning_queries, check_queries = tuning_queries or {}, check_queries or {}
    pending: dict[str, list] = {}
    shard_pieces = iter(pieces)
    for plan in plans:
        uri = join_uri(index_uri, plan.path) if plan.path else index_uri
        tuning = _shared(tuning_queries.get(plan.name))
        users, items = (_shared(q) for q in check_queries.get(plan.name, (None, None)))
        pending[plan.name] = [task.remote(size, i, storage, uri, config, plan.num_items, tuning, plan.num_shards,
                                          check_k, users, items, *next(shard_pieces), lease=lease)
                              for i, size in enumerate(plan.sizes)]
    del pieces, shard_pieces  # from here each piece lives as long as the task that reads it
    return {name: ray.get(refs) for name, refs in pending.items()}


def _shared(value):
    """An object ref for a task argument shared by many tasks: ``value`` itself if already one, None for
    nothing (None or empty), else ``value`` put in the object store once."""
    import ray

    if value is None or isinstance(value, ray.ObjectRef):
        return value
    if isinstance(value, np.ndarray) and not len(value):
        return None
    return ray.put(value)
