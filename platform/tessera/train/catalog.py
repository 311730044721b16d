"""The item feature table every worker holds: per-modality embeddings indexed by catalog row (no Ray).

An embedding run is small next to the interaction log (items x ~1.1k floats: 4.6 MB per 1000 items), so
training holds it whole (one copy a node, read once a run: :mod:`tessera.train.shared`) and indexes it by
*catalog row*: the position of the item id in the sorted id list. Sorting makes the row of an id the same
in every process without passing a mapping around.

Example::

    cat = ItemCatalog.load(storage, "s3://tessera-demo/embeddings/demo")
    rows = cat.rows(["item-000001", "item-000002"])          # int64 catalog rows, -1 if unknown
    feats, masks = cat.features(torch.tensor(rows))          # m -> (B, Dm) float, m -> (B,) bool
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tessera.embed.output import committed_parts
from tessera.models import hash_item_ids
from tessera.storage import Storage, join_uri

MANIFEST = "_MANIFEST.json"


def vector_matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``fixed_size_list<float32>[dim]`` column -> ``(N, dim)`` float32 (zeros where null), ``(N,)`` bool present."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    present = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    values = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    out = np.zeros((len(arr), dim), dtype=np.float32)
    # flatten() drops null slots, so the values fill the present rows in order.
    out[present] = values.reshape(-1, dim)
    finite = np.isfinite(out).all(axis=1)
    return np.where(finite[:, None], out, 0.0).astype(np.float32), present & finite


@dataclass
class ItemCatalog:
    """Item ids (sorted) and, per modality, an ``(I, Dm)`` embedding matrix and ``(I,)`` present mask.

    Attributes:
        item_ids: ``(I,)`` sorted item id strings; row ``i`` of every matrix belongs to ``item_ids[i]``.
        embeddings: modality -> ``(I, Dm)`` float32 tensor (zeros where absent or failed).
        present: modality -> ``(I,)`` bool tensor.
    """

    item_ids: np.ndarray
    embeddings: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def modalities(self) -> list[str]:
        return list(self.embeddings)

    @property
    def dims(self) -> dict[str, int]:
        return {m: int(e.shape[1]) for m, e in self.embeddings.items()}

    @classmethod
    def from_table(cls, table: pa.Table, dims: dict[str, int]) -> ItemCatalog:
        """Build from an embeddings table (``item_id`` + one vector column per modality in ``dims``)."""
        ids = np.asarray(table.column("item_id").to_pylist(), dtype=object)
        if len(set(ids.tolist())) != len(ids):
            raise ValueError("the embeddings table holds an item id more than once")
        order = np.argsort(ids.astype(str), kind="stable")
        embeddings, present = {}, {}
        for m, dim in dims.items():
            mat, ok = vector_matrix(table.column(m), dim)
            embeddings[m] = torch.from_numpy(mat[order])
            present[m] = torch.from_numpy(ok[order])
        return cls(item_ids=ids[order].astype(str), embeddings=embeddings, present=present)

    @classmethod
    def load(cls, storage: Storage, embeddings_uri: str) -> ItemCatalog:
        """Read an embedding run (its Parquet parts and ``_MANIFEST.json``) from storage."""
        manifest = storage.read_json(join_uri(embeddings_uri, MANIFEST))
        dims = {m: int(e["dim"]) for m, e in manifest["encoders"].items()}
        parts = committed_parts(storage, embeddings_uri, manifest)
        if not parts:
            raise FileNotFoundError(f"no Parquet parts under {embeddings_uri}")
        fs, _ = storage.filesystem(parts[0])
        tables = [pq.read_table(storage.filesystem(p)[1], filesystem=fs, columns=["item_id", *dims]) for p in parts]
        return cls.from_table(pa.concat_tables(tables), dims)

    def arrays(self) -> dict:
        """The table as numpy arrays on the CPU (``item_ids``, ``embeddings``, ``present``), what
        :meth:`from_arrays` takes: what training workers share through Ray's object store."""
        return {"item_ids": self.item_ids,
                "embeddings": {m: e.detach().cpu().numpy() for m, e in self.embeddings.items()},
                "present": {m: p.detach().cpu().numpy() for m, p in self.present.items()}}

    @classmethod
    def from_arrays(cls, arrays: dict) -> ItemCatalog:
        """The table over :meth:`arrays` without a copy, read-only ones included (a catalog's tensors are
        never written: lookups index them, :meth:`to` copies them to another device)."""
        with warnings.catch_warnings():  # torch warns of every read-only array it wraps
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return cls(item_ids=arrays["item_ids"],
                       embeddings={m: torch.from_numpy(e) for m, e in arrays["embeddings"].items()},
                       present={m: torch.from_numpy(p) for m, p in arrays["present"].items()})

    def rows(self, item_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Catalog row of each id, ``-1`` for ids not in the catalog."""
        ids = np.asarray(item_ids).astype(str)
        pos = np.searchsorted(self.item_ids, ids)
        pos = np.clip(pos, 0, max(self.num_items - 1, 0))
        found = self.item_ids[pos] == ids if self.num_items else np.zeros(len(ids), bool)
        return np.where(found, pos, -1).astype(np.int64)

    @property
    def device(self) -> torch.device:
        """Where the catalog's tensors are (see :meth:`to`)."""
        return next(iter(self.embeddings.values())).device if self.embeddings else torch.device("cpu")

    def id_buckets(self, num_buckets: int) -> torch.Tensor:
        """``(I,)`` hashed id bucket of every catalog row (see :func:`tessera.models.hash_item_ids`), on
        the catalog's device."""
        return hash_item_ids(self.item_ids.tolist(), num_buckets).to(self.device)

    def features(self, rows: torch.Tensor, modalities: Sequence[str] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Embeddings and present masks of catalog ``rows`` (any shape ``S``): m -> ``(*S, Dm)``, m -> ``S``."""
        names = self.modalities if modalities is None else list(modalities)
        return ({m: self.embeddings[m][rows] for m in names}, {m: self.present[m][rows] for m in names})

    def to(self, device: torch.device | str) -> ItemCatalog:
        """The same table with its tensors on ``device``."""
        return ItemCatalog(self.item_ids, {m: e.to(device) for m, e in self.embeddings.items()},
                           {m: p.to(device) for m, p in self.present.items()})
