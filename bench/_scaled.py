"""A larger servable version made from the demo's real artifacts: a scaled embedding run, then the real index job.

The embedding run keeps the source run's items unchanged and adds synthetic copies under new ids
(``<source id>-x<copy>``): each copy's vector of a modality is the source item's vector plus Gaussian
noise with ``spread**2`` times the covariance of the source vectors of that modality, re-normalised
(with the demo bundle, spread 0.5 puts a copy's fused vector at cosine ~0.94 to its original's, whose
nearest other original is at ~0.83); a modality absent or failed in the source item is absent or
failed (same error) in its copies. The run gets its own ``_MANIFEST.json`` (the source's,
with counts recomputed from the written parts). The index is then built by ``run_index_job`` with
``configs/index.yaml``, the given model bundle and ``embeddings_uri`` pointing at the scaled run; the
interaction log stays the source corpus' (its users' histories name original items).

Both are cached by name in the bench bucket of the store they are written to: a version whose index
manifest exists is reused as is.

Example::

    version = scaled_version(Storage(), "s3://tessera-demo/embeddings/demo", "s3://tessera-demo/models/v1",
                             "s3://tessera-bench/serve", num_items=100_000)
    version.index_uri, version.corpus
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench._stack import repo_root
from tessera.embed.output import MODALITIES, committed_parts, tally, write_part
from tessera.storage import Storage, join_uri
from tessera.train.catalog import vector_matrix

MANIFEST = "_MANIFEST.json"


@dataclass
class ScaledVersion:
    index_uri: str
    embedding_run: str
    item_ids: list[str]
    corpus: dict


def _read_run(storage: Storage, run_uri: str) -> pa.Table:
    tables = []
    for uri in committed_parts(storage, run_uri):
        fs, path = storage.filesystem(uri)
        tables.append(pq.read_table(path, filesystem=fs))
    table = pa.concat_tables(tables)
    return table.take(pc.sort_indices(table, [("item_id", "ascending")]))


def source_spread(vectors: np.ndarray, present: np.ndarray) -> np.ndarray:
    """``(n, d)`` centred source vectors / sqrt(n - 1): ``g @ this`` with ``g ~ N(0, I_n)`` has their covariance."""
    x = vectors[present]
    return ((x - x.mean(axis=0)) / np.sqrt(max(len(x) - 1, 1))).astype(np.float32)


def _noisy(vectors: np.ndarray, spread_basis: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """``(n, d)`` unit vectors plus Gaussian noise with ``spread**2`` x the source covariance, back on the sphere.

    Noise shaped like the data, not isotropic: encoders use few directions (the seeded image encoder puts
    any two items at cosine ~0.98), and isotropic noise off those directions is blown up by the item
    tower's input standardisation, turning every copy into an unrelated vector."""
    g = rng.standard_normal((len(vectors), len(spread_basis)), dtype=np.float32)
    out = vectors + spread * (g @ spread_basis)  # (n, d)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _copies(source: pa.Table, dims: dict[str, int], base: dict, start: int, stop: int, spread: float,
            seed: int) -> pa.Table:
    """Synthetic rows ``start..stop-1`` (0-based over the copies): copy ``j`` of source row ``i``."""
    n0 = source.num_rows
    idx = np.arange(start, stop)
    src, copy = idx % n0, idx // n0 + 1
    ids = source.column("item_id").to_numpy(zero_copy_only=False)
    rng = np.random.default_rng([seed, start])
    cols: dict[str, pa.Array] = {"item_id": pa.array([f"{ids[i]}-x{c:03d}" for i, c in zip(src, copy, strict=True)],
                                                     pa.string())}
    for m, dim in dims.items():
        vectors, present, basis = base[m]
        flat = _noisy(vectors[src], basis, spread, rng)  # (n, dim); rows of absent modalities are masked out
        cols[m] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float32()), dim,
                                                    mask=pa.array(~present[src]))
        cols[f"{m}_error"] = source.column(f"{m}_error").take(pa.array(src))
    return pa.table(cols).select(source.column_names).cast(source.schema)


def write_scaled_run(storage: Storage, source_run: str, run_uri: str, num_items: int, spread: float, seed: int,
                     rows_per_part: int = 10_000) -> dict:
    """Write the scaled embedding run (parts, then ``_MANIFEST.json``); returns the manifest."""
    t0 = time.perf_counter()
    src_manifest = storage.read_json(join_uri(source_run, MANIFEST))
    source = _read_run(storage, source_run)
    n0 = source.num_rows
    if num_items < n0:
        raise ValueError(f"num_items={num_items} is below the source run's {n0} items")
    dims = {m: int(src_manifest["encoders"][m]["dim"]) for m in MODALITIES if m in src_manifest["encoders"]}
    base = {}
    for m, dim in dims.items():
        vectors, present = vector_matrix(source.column(m), dim)
        base[m] = (vectors, present, source_spread(vectors, present))
    noise = {m: round(float(spread * np.linalg.norm(basis)), 5) for m, (_, _, basis) in base.items()}
    write_part(storage, run_uri, source)  # the originals, unchanged
    for start in range(0, num_items - n0, rows_per_part):
        write_part(storage, run_uri, _copies(source, dims, base, start, min(start + rows_per_part, num_items - n0),
                                             spread, seed))
    counted = tally(storage, run_uri, list(dims))
    if counted.rows != num_items or counted.duplicates:
        raise RuntimeError(f"{run_uri}: {counted.rows} rows ({counted.duplicates} duplicates), expected {num_items}")
    run_id = run_uri.rstrip("/").rsplit("/", 1)[-1]
    manifest = {
        **src_manifest, "run_id": run_id, "complete": True,
        "config": {**src_manifest["config"], "run_id": run_id, "output_uri": run_uri.rstrip("/").rsplit("/", 1)[0]},
        "input": {**src_manifest["input"], "items": num_items},
        "output": {"uri": run_uri, "rows": counted.rows, "parts": counted.parts},
        "counts": {m: {"input": c["input"], "ok": c["ok"], "failed": c["failed"], "missing": c["missing"],
                       "errors": c["failed_by_kind"]} for m, c in counted.per_modality.items()},
        "timings": {"total_s": round(time.perf_counter() - t0, 3)},
        "scaled_from": {"run": source_run, "run_id": src_manifest.get("run_id"), "source_items": n0,
                        "synthetic_items": num_items - n0, "spread": spread, "noise_norm": noise, "seed": seed,
                        "how": "copies of the source items under new ids (<id>-x<copy>): per modality the source "
                               "vector plus Gaussian noise with spread^2 x the covariance of the source vectors "
                               "(expected norm noise_norm[m]), re-normalised; absent or failed modalities stay "
                               "absent or failed"},
    }
    storage.write_json(join_uri(run_uri, MANIFEST), manifest)
    return manifest


def scaled_version(storage: Storage, source_run: str, model_uri: str, root: str, num_items: int,
                   spread: float = 0.5, seed: int = 0, index_overrides: dict | None = None) -> ScaledVersion:
    """The scaled embedding run and its index under ``root``, built unless cached; needs Ray for the index job.

    ``index_overrides`` update the ``index:`` section of ``configs/index.yaml`` (ScaNN build settings);
    they are part of the index's cache name."""
    from tessera.config import load_config
    from tessera.index import INDEX_MANIFEST, IndexConfig, read_index_manifest
    from tessera.index_job import IndexJobConfig, run_index_job

    src_manifest = storage.read_json(join_uri(source_run, MANIFEST))
    model_version = str(storage.read_json(join_uri(model_uri, MANIFEST))["version"])
    name = f"{src_manifest['run_id']}-{model_version}-{num_items}-spread{spread:g}-seed{seed}"
    overrides = dict(sorted((index_overrides or {}).items()))
    index_name = name + ("-" + hashlib.sha1(json.dumps(overrides).encode()).hexdigest()[:8] if overrides else "")
    run_uri = join_uri(root, "embeddings", name)
    index_uri = join_uri(root, "index", index_name)
    t0 = time.perf_counter()
    built = []
    if not storage.exists(join_uri(run_uri, MANIFEST)):
        write_scaled_run(storage, source_run, run_uri, num_items, spread, seed)
        built.append("embedding_run")
    run_manifest = storage.read_json(join_uri(run_uri, MANIFEST))
    if not storage.exists(join_uri(index_uri, INDEX_MANIFEST)):
        cfg = load_config(IndexJobConfig, repo_root() / "configs" / "index.yaml")
        cfg = cfg.model_copy(update={"model_uri": model_uri, "output_uri": join_uri(root, "index"),
                                     "version": index_name, "embeddings_uri": run_uri,
                                     "index": IndexConfig.model_validate({**cfg.index.model_dump(), **overrides})})
        run_index_job(cfg)
        built.append("index")
    manifest = read_index_manifest(storage, index_uri)
    ids = []
    for uri in committed_parts(storage, run_uri):
        fs, path = storage.filesystem(uri)
        ids += pq.read_table(path, filesystem=fs, columns=["item_id"]).column("item_id").to_pylist()
    scaled = run_manifest["scaled_from"]
    corpus = {
        "items": manifest.num_items, **{k: scaled[k] for k in ("source_items", "synthetic_items", "how", "spread",
                                                               "noise_norm", "seed")},
        "source_run": source_run, "model_uri": model_uri,
        "embedding_run": run_uri, "index_uri": index_uri, "index_shards": manifest.num_shards,
        "index_overrides": overrides, "index_build": {k: manifest.build_config.get(k) for k in (
            "num_neighbors", "reorder_num_neighbors", "anisotropic_quantization_threshold", "recall_target")},
        "fused_shards": [{"items": sh.count, "mode": sh.params.mode,
                          "reorder_num_neighbors": sh.params.reorder_num_neighbors} for sh in manifest.shards],
        "modal_indexes": sorted(manifest.modal_indexes), "interactions_uri": manifest.source.get("interactions_uri"),
        "index_recall_at_10": {k: round(c.recall, 4) for k, c in manifest.recall_checks.items()},
        "built_now": built or "cached", "prepare_s": round(time.perf_counter() - t0, 1),
    }
    return ScaledVersion(index_uri=index_uri, embedding_run=run_uri, item_ids=ids, corpus=corpus)
