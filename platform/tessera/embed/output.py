"""The embeddings artifact: Parquet parts under ``<output_uri>/<run_id>/`` and their tally.

Schema (ARCHITECTURE.md): ``item_id``; one ``fixed_size_list<float32>[dim]`` column per modality,
L2-normalised, null where the modality is absent or failed; one ``<modality>_error`` string column per
modality (null unless that modality failed for the item).

Each part file is named by a hash of the item ids it holds, so a retried write task overwrites its
own file instead of adding a duplicate, and an S3 object is either complete or absent: a run killed
halfway leaves only whole parts, which a rerun reads to skip what is done.

A finished run's ``_MANIFEST.json`` lists its parts (``output.files``, names relative to the run):
readers take those (:func:`committed_parts`), not whatever the folder holds. Part names carry the
writing attempt's id. An attempt that lost the run to another (:class:`~tessera.lease.RunLease`) may
still have writes in flight; a part of its that lands after the new attempt listed what was done
repeats items the new attempt writes too (as does one left by an attempt that stopped between this
settling and its manifest). When the tally finds repeated ids, a part each of whose ids is also in a
part kept is left out of the tally and the manifest (:func:`superseded_copies`) and deleted after the
manifest is written; a part landing later is not in the manifest's list.

Each part records, in its Parquet schema metadata (``tessera.weights``), the checksum of the weights
each modality's actors encoded it with (:func:`part_weights`): a resumed run compares them with the
weights it is about to load, and the tally collects them, so a run never mixes two sets of weights
unnoticed (same-named weights replaced between attempts included).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from tessera.embed.ids import (
    colliding,
    file_ids_with_hashes,
    hash_ids,
    is_member,
    map_files,
    new_key,
)
from tessera.storage import Storage, join_uri

MODALITIES = ("text", "image", "audio")
MANIFEST = "_MANIFEST.json"
WEIGHTS_METADATA = b"tessera.weights"  # a part's schema metadata: {modality: [weights checksums]}


def vector_column(vectors: list[np.ndarray | None], dim: int) -> pa.FixedSizeListArray:
    """``fixed_size_list<float32>[dim]`` with nulls where ``vectors[i] is None``."""
    flat = np.zeros((len(vectors), dim), dtype=np.float32)
    mask = np.ones(len(vectors), dtype=bool)
    for i, v in enumerate(vectors):
        if v is not None:
            flat[i] = v
            mask[i] = False
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim, mask=pa.array(mask))


def ids_digest(item_ids: list[str]) -> str:
    """A hex digest of a list of item ids (order counts)."""
    return hashlib.sha1("\n".join(item_ids).encode()).hexdigest()


def part_name(item_ids: list[str], attempt: str | None = None) -> str:
    """``part-[<attempt>-]<digest of the ids>.parquet``: a retried write of the same items in the same
    attempt overwrites its own file; another attempt's part is another file."""
    return "part-" + (f"{attempt}-" if attempt else "") + ids_digest(item_ids)[:20] + ".parquet"


def write_part(storage: Storage, run_uri: str, table: pa.Table, attempt: str | None = None,
               weights: dict[str, list[str]] | None = None) -> str:
    """Write one part atomically (:meth:`~tessera.storage.Storage.write_parquet`: encoded in memory, then
    one PutObject or a local rename), so that a writer stopped at any moment leaves the whole part or
    none of it: a rerun reads every part it finds. ``attempt``: the writing attempt's id, in the name;
    ``weights``: per modality, the checksums of the weights its rows were encoded with (metadata)."""
    uri = join_uri(run_uri, part_name(table.column("item_id").to_pylist(), attempt))
    if weights:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               WEIGHTS_METADATA: json.dumps(weights, sort_keys=True).encode()})
    storage.write_parquet(uri, table)
    return uri


def part_weights(table: pa.Table) -> dict[str, list[str]]:
    """The weights checksums a part records per modality (``{}`` for a part written before parts
    recorded them, or by a writer that was given none)."""
    raw = (table.schema.metadata or {}).get(WEIGHTS_METADATA)
    return json.loads(raw) if raw else {}


def merge_weights(into: dict[str, dict[str, str]], part_uri: str, found: dict[str, list[str]]) -> None:
    """Add one part's :func:`part_weights` to ``into`` ({modality: {checksum: the first part found with it}})."""
    for m, checksums in found.items():
        for checksum in checksums:
            into.setdefault(m, {}).setdefault(checksum, part_uri)


@dataclass
class Tally:
    """Counts over the parts of a run, recomputed from storage (the source of truth)."""

    rows: int = 0
    distinct_ids: int = 0
    parts: int = 0
    per_modality: dict[str, dict] = field(default_factory=dict)
    repeated_parts: list[str] = field(default_factory=list)  # parts holding an id hash found more than once
    weights: dict[str, dict[str, str]] = field(default_factory=dict)  # see merge_weights

    @property
    def duplicates(self) -> int:
        return self.rows - self.distinct_ids


def name_of(uri: str) -> str:
    """A part's (or any object's) name: the last segment of its URI."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def list_parts(storage: Storage, run_uri: str) -> list[str]:
    """Every ``part-*.parquet`` in the run's folder now (sorted URIs, not in subfolders), committed or not."""
    return [u for u in storage.list_files(run_uri, ".parquet", recursive=False) if name_of(u).startswith("part-")]


def committed_parts(storage: Storage, run_uri: str, manifest: dict | None = None) -> list[str]:
    """The parts of a finished run: the ones its manifest lists (``output.files``), so a part written
    late by a superseded attempt is not read; for a manifest written before that list existed, every
    part in the folder. ``manifest``: the run's ``_MANIFEST.json`` if already read.

    Raises:
        FileNotFoundError: the run has no manifest (it is missing or not finished)."""
    if manifest is None:
        manifest = storage.read_json(join_uri(run_uri, MANIFEST))
    files = (manifest.get("output") or {}).get("files")
    if files is None:
        return list_parts(storage, run_uri)
    return [join_uri(run_uri, name) for name in files]


MAX_PARTS_TO_SETTLE = 4096  # parts holding repeated ids whose ids the driver reads to settle them


def superseded_copies(storage: Storage, suspects: list[str]) -> list[str]:
    """Of the parts holding repeated ids (``suspects``, tried in this order), those to leave out of the
    run: a part goes when every one of its ids is also in a part still kept (ids compared as strings).
    Leaving them out loses nothing; a repeat they do not explain stays (the tally reports it).

    Every other copy of a repeated id is in a part holding a repeated id, so only ``suspects`` are read."""
    ids = {uri: storage.read_parquet(uri, ["item_id"]).column("item_id").to_pylist() for uri in suspects}
    copies = Counter(i for found in ids.values() for i in found)
    out = []
    for uri in suspects:
        if ids[uri] and all(copies[i] > 1 for i in ids[uri]):
            out.append(uri)
            copies.subtract(ids[uri])
    return out


def done_items(storage: Storage, run_uri: str, key: str, num_cpus: float = 0.25,
               use_ray: bool | None = None) -> tuple[np.ndarray, dict[str, dict[str, str]]]:
    """What earlier attempts of this run wrote: the sorted distinct ``uint64`` hashes (under ``key``,
    see :mod:`tessera.embed.ids`) of their item ids, and the weights their parts record (see
    :func:`merge_weights`); many parts are read by Ray tasks (``use_ray``: see
    :func:`~tessera.embed.ids.map_files`)."""
    parts = list_parts(storage, run_uri)
    scans = map_files(_done_part, parts, storage, key, num_cpus=num_cpus, use_ray=use_ray)
    weights: dict[str, dict[str, str]] = {}
    for uri, (_, found) in zip(parts, scans, strict=True):
        merge_weights(weights, uri, found)
    hashes = np.unique(np.concatenate([h for h, _ in scans])) if scans else np.empty(0, np.uint64)
    return hashes, weights


def _done_part(uri: str, storage: Storage, key: str) -> tuple[np.ndarray, dict[str, list[str]]]:
    table = storage.read_parquet(uri, ["item_id"])
    return hash_ids(table.column("item_id"), key), part_weights(table)


def _tally_part(uri: str, storage: Storage, modalities: list[str], key: str) -> dict:
    """One part's rows, per-modality counts and item id hashes."""
    table = storage.read_parquet(uri, ["item_id"] + [c for m in modalities for c in (m, f"{m}_error")])
    counts = {}
    for m in modalities:
        vec_ok = table.column(m).is_valid().to_numpy(zero_copy_only=False)
        errors = table.column(f"{m}_error").to_pylist()
        c = counts[m] = {"ok": int(vec_ok.sum()), "failed": 0, "missing": 0, "failed_by_kind": {}}
        for ok, err in zip(vec_ok, errors, strict=True):
            if err is not None:
                c["failed"] += 1
                kind = err.split(":", 1)[0]
                c["failed_by_kind"][kind] = c["failed_by_kind"].get(kind, 0) + 1
            elif not ok:
                c["missing"] += 1
    return {"rows": table.num_rows, "counts": counts, "hashes": hash_ids(table.column("item_id"), key),
            "weights": part_weights(table)}


def tally(storage: Storage, run_uri: str, modalities: list[str], num_cpus: float = 0.25,
          use_ray: bool | None = None, parts: list[str] | None = None) -> Tally:
    """Count rows, distinct ids and, per modality, ok / failed (by kind) / missing, from the written parts
    (``parts``, default: every part in the folder).

    Many parts are read by Ray tasks (the driver keeps counts and 8 bytes an item either way);
    the distinct count is exact: ids sharing a hash are read again and compared (:mod:`tessera.embed.ids`).
    ``use_ray``: see :func:`~tessera.embed.ids.map_files`."""
    t = Tally(per_modality={m: {"ok": 0, "failed": 0, "missing": 0, "failed_by_kind": {}} for m in modalities})
    if parts is None:
        parts = list_parts(storage, run_uri)
    key = new_key()
    scans = map_files(_tally_part, parts, storage, list(modalities), key, num_cpus=num_cpus, use_ray=use_ray)
    for uri, scan in zip(parts, scans, strict=True):
        t.parts += 1
        t.rows += scan["rows"]
        merge_weights(t.weights, uri, scan["weights"])
        for m, part in scan["counts"].items():
            c = t.per_modality[m]
            for name in ("ok", "failed", "missing"):
                c[name] += part[name]
            for kind, n in part["failed_by_kind"].items():
                c["failed_by_kind"][kind] = c["failed_by_kind"].get(kind, 0) + n
    distinct, repeated = colliding([scan["hashes"] for scan in scans])
    t.repeated_parts = [uri for uri, scan in zip(parts, scans, strict=True)
                        if is_member(repeated, scan["hashes"]).any()]
    if len(repeated):  # a repeated id, or distinct ids sharing a hash: count those ids as strings
        found = map_files(file_ids_with_hashes, parts, storage, key, repeated, num_cpus=num_cpus, use_ray=use_ray)
        distinct += len({item for ids in found for item in ids}) - len(repeated)
    t.distinct_ids = distinct
    for c in t.per_modality.values():
        c["input"] = c["ok"] + c["failed"]
    return t
