"""Generate the sample corpus into object storage with parallel Ray tasks, one part per task.

Each task builds one part (rows + media + truth) from its seed, uploads the media with a bounded
thread pool, then writes the part's Parquet files; the driver keeps at most ``max_parts_in_flight``
tasks running and holds only per-part counts, so memory stays flat from 1k to 1M items.

Example::

    summary = generate_corpus(load_config(CorpusConfig, "configs/corpus.yaml"))
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from tessera.corpus.catalog import CatalogLatents, catalog_latents
from tessera.corpus.config import CorpusConfig
from tessera.corpus.interactions import generate_user_part
from tessera.corpus.items import build_item_part
from tessera.storage import Storage, join_uri

MANIFEST = "corpus/_MANIFEST.json"


def _write_table(storage: Storage, uri: str, table: pa.Table) -> None:
    storage.write_parquet(uri, table)  # whole or absent: a killed run never leaves a part that looks done


def write_item_part(cfg: CorpusConfig, part: int) -> dict:
    """Build and upload item part ``part``; returns its counts."""
    storage = Storage(cfg.storage)
    built = build_item_part(cfg, part)
    with ThreadPoolExecutor(cfg.upload_threads) as pool:
        # pyarrow's faster, non-atomic puts: a killed run has not written this part's items file yet,
        # so its rerun writes these objects again
        list(pool.map(lambda kv: storage.write_bytes(*kv, atomic=False), built.objects.items()))
    name = f"part-{part:05d}.parquet"
    _write_table(storage, join_uri(cfg.root, "truth", "items", name), built.truth_table())
    # the items part goes last: a part's rows never point at media that is not there yet
    _write_table(storage, join_uri(cfg.root, "corpus", "items", name), built.items_table())
    t = built.truth
    return {
        "items": len(t["item_id"]),
        "media_objects": len(built.objects),
        "media_bytes": sum(len(b) for b in built.objects.values()),
        "with_text": sum(t["has_text"]), "with_image": sum(t["has_image"]), "with_audio": sum(t["has_audio"]),
        "real_media": sum(t["real_media"]),
        "bad": dict(Counter(k for k in t["bad_kind"] if k)),
    }


def write_user_part(cfg: CorpusConfig, part: int, cat: CatalogLatents) -> dict:
    storage = Storage(cfg.storage)
    built = generate_user_part(cfg, part, cat)
    name = f"part-{part:05d}.parquet"
    _write_table(storage, join_uri(cfg.root, "truth", "users", name), pa.table(built.users))
    inter = pa.table({
        "user_id": pa.array(built.interactions["user_id"], pa.string()),
        "item_id": pa.array(built.interactions["item_id"], pa.string()),
        "ts": pa.array(built.interactions["ts"], pa.int64()),
        "event": pa.array(built.interactions["event"], pa.string()),
        "weight": pa.array(built.interactions["weight"], pa.float32()),
    })
    _write_table(storage, join_uri(cfg.root, "corpus", "interactions", name), inter)
    return {"users": len(built.users["user_id"]), "interactions": inter.num_rows}


def _merge(total: dict, part: dict) -> None:
    for k, v in part.items():
        if isinstance(v, dict):
            _merge(total.setdefault(k, {}), v)
        else:
            total[k] = total.get(k, 0) + v


def _run_bounded(submit, n_parts: int, max_in_flight: int, label: str) -> dict:
    import ray

    total: dict = {}
    pending, next_part, done = [], 0, 0
    while next_part < n_parts or pending:
        while next_part < n_parts and len(pending) < max_in_flight:
            pending.append(submit(next_part))
            next_part += 1
        ready, pending = ray.wait(pending, num_returns=1)
        _merge(total, ray.get(ready[0]))
        done += 1
        if done == n_parts or done % max(1, n_parts // 10) == 0:
            print(f"[corpus] {label}: {done}/{n_parts} parts", flush=True)
    return total


def generate_corpus(cfg: CorpusConfig, force: bool = False) -> dict:
    """Write the corpus under ``cfg.root`` and return its manifest (also written to ``corpus/_MANIFEST.json``).

    Deterministic for ``cfg.seed``. If a corpus with the same content settings is already there, it is
    kept and its manifest returned (``force=True`` regenerates it). A corpus with other settings at
    the same root is an error: delete it explicitly or choose another root.
    """
    import ray

    storage = Storage(cfg.storage)
    storage.ensure_bucket(cfg.root)
    manifest_uri = join_uri(cfg.root, MANIFEST)
    if storage.exists(manifest_uri):
        existing = storage.read_json(manifest_uri)
        settings = dict(existing.get("config") or {})
        if isinstance(settings.get("real_media"), dict):  # manifests before the folder left the identity
            settings["real_media"] = {k: v for k, v in settings["real_media"].items() if k != "data_dir"}
        if settings == cfg.identity() and not force:
            existing["reused"] = True
            return existing
        if settings != cfg.identity():
            raise FileExistsError(
                f"{manifest_uri} describes a corpus made with other settings; remove {cfg.root}/corpus and "
                f"{cfg.root}/truth first, or write to another root")
    t0 = time.perf_counter()
    opts = {"num_cpus": cfg.task_num_cpus, "max_retries": 3}
    item_task = ray.remote(**opts)(write_item_part)
    items = _run_bounded(lambda p: item_task.remote(cfg, p), cfg.num_item_parts, cfg.max_parts_in_flight, "items")
    t_items = time.perf_counter() - t0
    cat_ref = ray.put(catalog_latents(cfg))
    user_task = ray.remote(**opts)(write_user_part)
    users = _run_bounded(lambda p: user_task.remote(cfg, p, cat_ref), cfg.num_user_parts,
                         cfg.max_parts_in_flight, "users")
    elapsed = time.perf_counter() - t0
    manifest = {
        "kind": "tessera.corpus",
        "root": cfg.root,
        "config": cfg.identity(),
        "counts": {**items, **users, "item_parts": cfg.num_item_parts, "user_parts": cfg.num_user_parts},
        "timings_s": {"items": round(t_items, 2), "users": round(elapsed - t_items, 2), "total": round(elapsed, 2)},
        "items_per_s": round(cfg.num_items / max(t_items, 1e-9), 1),
    }
    storage.write_json(manifest_uri, manifest)
    return manifest
