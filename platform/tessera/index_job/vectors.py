"""Item vectors: the bundle's item tower over every row of the embedding run (Ray Data, streaming).

    embedding parts ─► read (tasks) ─► [ItemVectorActor pool: tower loaded once] ─► write vectors parts

The output, ``<index>/vectors/part-*.parquet``, holds every input item exactly once:

======================  ===================================================================
``item_id``             string
``status``              ``ok`` (in the fused index) or ``no_modality`` (no usable modality and
                        ``no_modality: exclude``: counted in the manifest, not indexed)
``modalities``          comma-joined modalities the item had (``""`` for none)
``fused``               ``fixed_size_list<float32>[out_dim]``: the fused item vector, for every item
                        (an item without a usable modality has the tower's learned "empty item"
                        vector, or its hashed-id one: what training fed the user tower for it)
``<modality>``          the tower's projection of that modality alone (null where absent), the
                        vectors of the per-modality indexes ``modal/<modality>/``
======================  ===================================================================

Serving and the self-check read ``fused`` to turn a user's history into a user vector with the same model.
Training reads an excluded item in a history as the tower makes it, so they do too: ``status`` decides
what the fused index holds (what can be recommended), not what a history can hold.

Example::

    summary = compute_item_vectors(cfg, sources, storage)
    summary.parts, summary.counts["indexed"]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tessera.embed.output import part_name
from tessera.storage import Storage, join_uri

VECTORS_DIR = "vectors"
FUSED = "fused"
STATUS_OK = "ok"
STATUS_NO_MODALITY = "no_modality"


def in_fused_index(status: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(n,) bool: the rows of a vectors table in the fused index, by their ``status`` column (``ok``); every
    row has a fused vector, so this, not a null, is what the index holds and serving can recommend."""
    return np.asarray(status.to_pylist(), dtype=object) == STATUS_OK


def column_matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """A nullable ``fixed_size_list<float32>[dim]`` column as (N, dim) float32, NaN rows where null."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.empty((0, dim), np.float32)
    values = arr.values.to_numpy(zero_copy_only=False)  # the child array ignores the parent's offset
    start = arr.offset * dim
    x = np.array(values[start:start + n * dim], dtype=np.float32).reshape(n, dim)  # (N, dim), a copy
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    x[~valid] = np.nan
    return x


def served_part(table: pa.Table, dim: int) -> tuple[list, np.ndarray, np.ndarray, str]:
    """What serving reads from a vectors part: its item ids, fused vectors ``(N, dim)`` float32 (zeros where
    null) and which rows have one, and their sha256 (ids, then vectors, then the rows with one). The index
    manifest records the digest per part (``item_vectors_sha256``) and serving checks it after reading only
    those two columns, where a whole-file checksum would make every replica read the per-modality vectors
    as well."""
    import hashlib

    from tessera.train.catalog import vector_matrix

    ids = table.column("item_id").to_pylist()
    values, present = vector_matrix(table.column(FUSED), dim)
    h = hashlib.sha256()
    for item in ids:
        h.update(str(item).encode("utf-8", "surrogatepass") + b"\0")
    h.update(np.ascontiguousarray(values, "<f4").tobytes())
    h.update(np.packbits(present).tobytes())
    return ids, values, present, h.hexdigest()


def matrix_column(x: np.ndarray, valid: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float32 as ``fixed_size_list<float32>[D]``, null where ``valid`` is False."""
    n, dim = x.shape
    flat = np.where(valid[:, None], x, 0).astype(np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), dim, mask=pa.array(~valid))


def item_vector_table(tower, table: pa.Table, no_modality: str = "exclude") -> pa.Table:
    """Fused and per-modality vectors of one batch of embedding rows (no Ray; the actor calls this).

    Args:
        tower: an :class:`~tessera.models.ItemTower` in eval mode, on any device (the batch goes there,
            the vectors come back to the host).
        table: rows of an embedding run (``item_id`` + modality vector columns; a modality of the
            tower missing from the table counts as absent for every row).
        no_modality: ``exclude`` or ``id_only`` (see :class:`~tessera.index_job.config.IndexJobConfig`).

    Returns:
        The vectors table described in the module docstring.

    Example::

        out = item_vector_table(bundle.item_tower.eval(), pa.table({"item_id": ["a"], "text": [...]}))
    """
    import torch

    from tessera.models.item_tower import hash_item_ids

    ids = table.column("item_id").to_pylist()
    n = len(ids)
    dims = tower.config.modality_dims
    device = next(tower.parameters()).device
    embeddings = {m: torch.from_numpy(column_matrix(table.column(m), dim)).to(device)
                  for m, dim in dims.items() if m in table.column_names}  # m -> (B, dim), NaN rows absent
    if not embeddings:
        raise ValueError(f"the embedding rows hold none of the tower's modalities {list(dims)}")
    id_buckets = None
    if tower.config.num_id_buckets:
        id_buckets = hash_item_ids(ids, tower.config.num_id_buckets).to(device)
    with torch.no_grad():
        fused = tower(embeddings, id_buckets=id_buckets).cpu().numpy()  # (B, out_dim)
        single = {m: (v.cpu(), p.cpu()) for m, (v, p) in tower.modality_vectors(embeddings).items()}
    present = {m: p.numpy() for m, (_, p) in single.items()}
    any_present = np.zeros(n, bool)
    for p in present.values():
        any_present |= p
    indexed = any_present | (no_modality == "id_only")
    names = [",".join(m for m in dims if m in present and present[m][i]) for i in range(n)]
    cols: dict[str, pa.Array] = {
        "item_id": pa.array(ids, pa.string()),
        "status": pa.array(np.where(indexed, STATUS_OK, STATUS_NO_MODALITY).tolist(), pa.string()),
        "modalities": pa.array(names, pa.string()),
        FUSED: matrix_column(fused, np.ones(n, bool)),  # every item: a history may hold an excluded one
    }
    for m in dims:
        if m in single:
            cols[m] = matrix_column(single[m][0].numpy(), present[m])
        else:
            cols[m] = matrix_column(np.zeros((n, tower.config.out_dim), np.float32), np.zeros(n, bool))
    return pa.table(cols)


class ItemVectorActor:
    """Ray Data actor: loads the bundle's item tower once, then maps embedding batches to vectors.

    Args:
        storage: where the bundle lives.
        model_uri: the bundle.
        no_modality: policy for items without a usable modality.
        torch_threads: intra-op threads (None: torch's default).
        device: ``auto`` (CUDA when the actor sees a GPU: the stage gives it one when ``num_gpus`` > 0),
            ``cpu`` or ``cuda``.
    """

    def __init__(self, storage: Storage, model_uri: str, no_modality: str, torch_threads: int | None,
                 device: str = "cpu"):
        import torch

        from tessera.encoders.base import choose_device
        from tessera.models.bundle import ModelBundle

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.tower = ModelBundle.load(storage, model_uri).item_tower.to(choose_device(device)).eval()
        self.no_modality = no_modality

    def __call__(self, table: pa.Table) -> pa.Table:
        return item_vector_table(self.tower, table, self.no_modality)


def read_embedding_parts(batch: dict, storage: Storage, columns: list[str], rows_per_batch: int):
    """Read the embedding parts named in ``batch["uri"]`` (only the wanted columns), in blocks."""
    for uri in batch["uri"]:
        fs, path = storage.filesystem(str(uri))
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            wanted = [c for c in columns if c in parquet.schema_arrow.names]
            for record_batch in parquet.iter_batches(batch_size=rows_per_batch, columns=wanted):
                if record_batch.num_rows:
                    yield pa.Table.from_batches([record_batch])


def write_vectors_part(table: pa.Table, index_uri: str, storage: Storage) -> pa.Table:
    """Write one vectors part (named by its ids' hash, so a retried task overwrites its own file)."""
    uri = join_uri(index_uri, VECTORS_DIR, part_name(table.column("item_id").to_pylist()))
    storage.write_parquet(uri, table)
    status = table.column("status").to_numpy(zero_copy_only=False)
    per_modality = {}
    for names in table.column("modalities").to_pylist():
        for m in filter(None, names.split(",")):
            per_modality[m] = per_modality.get(m, 0) + 1
    empty = sum(1 for names in table.column("modalities").to_pylist() if not names)
    digest = served_part(table, table.schema.field(FUSED).type.list_size)[3]
    return pa.table({"part": [uri], "rows": [table.num_rows], "ok": [int((status == STATUS_OK).sum())],
                     "empty": [empty], "per_modality": [json.dumps(per_modality)], "digest": [digest]})


@dataclass
class VectorsSummary:
    """What the vector stage wrote.

    ``counts``: ``rows`` (every input item), ``indexed`` (in the fused index), ``excluded_no_modality``
    (left out: no usable modality), ``no_modality`` (items without any usable modality, whatever the
    policy); ``per_modality``: items with a usable vector of each modality.
    """

    parts: list[str] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)  # part URI -> its served_part digest
    counts: dict[str, int] = field(default_factory=dict)
    per_modality: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def compute_item_vectors(storage: Storage, parts: list[str], index_uri: str, model_uri: str, modalities: list[str],
                         stage, no_modality: str) -> VectorsSummary:
    """Run the tower over every embedding part, streaming, and write the vectors parts.

    Args:
        storage: object storage.
        parts: the embedding run's Parquet parts.
        index_uri: the index version's root (parts go to ``<index_uri>/vectors/``).
        model_uri: the bundle.
        modalities: the tower's modalities (columns to read).
        stage: a :class:`~tessera.index_job.config.VectorStageConfig`.
        no_modality: policy for items without a usable modality.

    Example::

        summary = compute_item_vectors(storage, src.embedding_parts, src.index_uri, cfg.model_uri,
                                       ["text", "image"], cfg.vectors, "exclude")
    """
    import time

    import ray

    start = time.perf_counter()
    ds = ray.data.from_items([{"uri": p} for p in parts], override_num_blocks=len(parts))
    ds = ds.map_batches(read_embedding_parts, batch_size=1, num_cpus=stage.read_num_cpus,
                        fn_kwargs={"storage": storage, "columns": ["item_id", *modalities],
                                   "rows_per_batch": stage.read_batch_rows})
    ds = ds.map_batches(ItemVectorActor, batch_format="pyarrow", batch_size=stage.batch_size,
                        num_cpus=stage.num_cpus, num_gpus=stage.num_gpus or None,
                        compute=ray.data.ActorPoolStrategy(size=stage.actors),
                        fn_constructor_kwargs={"storage": storage, "model_uri": model_uri,
                                               "no_modality": no_modality, "torch_threads": stage.torch_threads,
                                               "device": "auto" if stage.num_gpus else "cpu"})
    ds = ds.map_batches(write_vectors_part, batch_format="pyarrow", batch_size=stage.read_batch_rows,
                        num_cpus=stage.read_num_cpus, fn_kwargs={"index_uri": index_uri, "storage": storage})
    summary = VectorsSummary(counts={"rows": 0, "indexed": 0, "no_modality": 0})
    for row in ds.iter_rows():
        summary.parts.append(str(row["part"]))
        summary.digests[str(row["part"])] = str(row["digest"])
        summary.counts["rows"] += int(row["rows"])
        summary.counts["indexed"] += int(row["ok"])
        summary.counts["no_modality"] += int(row["empty"])
        for m, c in json.loads(row["per_modality"]).items():
            summary.per_modality[m] = summary.per_modality.get(m, 0) + c
    summary.counts["excluded_no_modality"] = summary.counts["rows"] - summary.counts["indexed"]
    summary.parts.sort()
    summary.seconds = time.perf_counter() - start
    return summary
