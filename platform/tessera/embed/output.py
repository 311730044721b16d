"""The embeddings artifact: Parquet parts under ``<output_uri>/<run_id>/`` and their tally.

Schema (ARCHITECTURE.md): ``item_id``; one ``fixed_size_list<float32>[dim]`` column per modality,
L2-normalised, null where the modality is absent or failed; one ``<modality>_error`` string column per
modality (null unless that modality failed for the item).

Each part file is named by a hash of the item ids it holds, so a retried write task overwrites its
own file instead of adding a duplicate, and an S3 object is either complete or absent: a run killed
halfway leaves only whole parts, which a rerun reads to skip what is done.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tessera.storage import Storage, join_uri, parse_uri

MODALITIES = ("text", "image", "audio")


def vector_column(vectors: list[np.ndarray | None], dim: int) -> pa.FixedSizeListArray:
    """``fixed_size_list<float32>[dim]`` with nulls where ``vectors[i] is None``."""
    flat = np.zeros((len(vectors), dim), dtype=np.float32)
    mask = np.ones(len(vectors), dtype=bool)
    for i, v in enumerate(vectors):
        if v is not None:
            flat[i] = v
            mask[i] = False
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim, mask=pa.array(mask))


def part_name(item_ids: list[str]) -> str:
    return "part-" + hashlib.sha1("\n".join(item_ids).encode()).hexdigest()[:20] + ".parquet"


def write_part(storage: Storage, run_uri: str, table: pa.Table) -> str:
    """Write one part atomically (S3 PUTs are atomic; local files are renamed into place)."""
    uri = join_uri(run_uri, part_name(table.column("item_id").to_pylist()))
    fs, path = storage.filesystem(uri)
    if parse_uri(uri).scheme == "file":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    else:
        storage.retrying_io(f"PUT {uri}", lambda: pq.write_table(table, path, filesystem=fs, compression="zstd"))
    return uri


@dataclass
class Tally:
    """Counts over the parts of a run, recomputed from storage (the source of truth)."""

    rows: int = 0
    distinct_ids: int = 0
    parts: int = 0
    per_modality: dict[str, dict] = field(default_factory=dict)

    @property
    def duplicates(self) -> int:
        return self.rows - self.distinct_ids


def list_parts(storage: Storage, run_uri: str) -> list[str]:
    return [u for u in storage.list_files(run_uri, ".parquet") if u.rsplit("/", 1)[-1].startswith("part-")]


def done_item_ids(storage: Storage, run_uri: str) -> set[str]:
    """Item ids already written by earlier attempts of this run."""
    done: set[str] = set()
    for uri in list_parts(storage, run_uri):
        fs, path = storage.filesystem(uri)
        done.update(pq.read_table(path, filesystem=fs, columns=["item_id"]).column("item_id").to_pylist())
    return done


def tally(storage: Storage, run_uri: str, modalities: list[str]) -> Tally:
    """Count rows, duplicates and, per modality, ok / failed (by kind) / missing."""
    t = Tally(per_modality={m: {"ok": 0, "failed": 0, "missing": 0, "failed_by_kind": {}} for m in modalities})
    ids: set[str] = set()
    for uri in list_parts(storage, run_uri):
        fs, path = storage.filesystem(uri)
        cols = ["item_id"] + [c for m in modalities for c in (m, f"{m}_error")]
        table = pq.read_table(path, filesystem=fs, columns=cols)
        t.parts += 1
        t.rows += table.num_rows
        ids.update(table.column("item_id").to_pylist())
        for m in modalities:
            vec_ok = table.column(m).is_valid().to_numpy(zero_copy_only=False)
            errors = table.column(f"{m}_error").to_pylist()
            c = t.per_modality[m]
            c["ok"] += int(vec_ok.sum())
            for ok, err in zip(vec_ok, errors, strict=True):
                if err is not None:
                    c["failed"] += 1
                    kind = err.split(":", 1)[0]
                    c["failed_by_kind"][kind] = c["failed_by_kind"].get(kind, 0) + 1
                elif not ok:
                    c["missing"] += 1
    t.distinct_ids = len(ids)
    for c in t.per_modality.values():
        c["input"] = c["ok"] + c["failed"]
    return t
